"""The storage layer (perf_pipeline.lib.storage) on local disk and on a real S3 server (the session's private
SeaweedFS): atomic writes under an exception and a real SIGKILL mid-upload, what the store says back (size,
ETag), leftovers swept, and the location checks' errors naming the setting without a secret."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from perf_pipeline.lib.storage import StorageError, open_store
from perf_pipeline.settings import PROJECT_ROOT
from perf_pipeline.testing import free_port
from perf_pipeline_tests.conftest import Location

KEY = "audit_log/month.parquet"


def _temps(location: Location) -> list[str]:
    return [k for k in location.objects() if "/." in f"/{k}"]


def test_a_commit_puts_the_whole_object_in_place_and_reports_it(location: Location) -> None:
    store = location.store
    data = os.urandom(3 << 20)
    with store.writer(KEY) as w:
        for i in range(0, len(data), 100_000):
            w.sink.write(data[i : i + 100_000])
    assert (w.size, w.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    info = store.info(KEY)
    assert info == w.info and info.size == len(data) and info.etag
    assert info.uri == (str(location.value / KEY) if location.kind == "local" else f"{location.value}/{KEY}")
    assert store.read_bytes(KEY) == data and store.sha256(KEY) == (len(data), w.sha256)
    assert location.objects() == [KEY]  # nothing temporary left
    store.write_bytes(KEY, b"other")  # a rewrite replaces it whole, with another ETag
    assert store.read_bytes(KEY) == b"other" and store.info(KEY).etag != info.etag
    assert store.info("audit_log/absent.parquet") is None
    with pytest.raises(FileNotFoundError):
        store.open_input("audit_log/absent.parquet")


def test_an_error_mid_write_leaves_the_old_object_and_no_temporary_one(location: Location) -> None:
    """pyarrow completes a multipart upload whenever its stream is closed, even by an exception: written
    straight to the final key, this left a truncated object there. The old object must survive."""
    store = location.store
    old = store.write_bytes(KEY, b"the verified archive")
    with pytest.raises(RuntimeError, match="injected"), store.writer(KEY) as w:
        w.sink.write(os.urandom(12 << 20))  # more than a multipart part: parts already uploaded
        raise RuntimeError("injected")
    assert store.read_bytes(KEY) == b"the verified archive" and store.info(KEY) == old
    assert _temps(location) == []


_SLOW_WRITER = """
import os, sys, time
from perf_pipeline.lib.storage import open_store
store = open_store(sys.argv[1], "PERF_PIPELINE_ARCHIVE_DIR")
with store.writer(sys.argv[2]) as w:
    for i in range(400):
        w.sink.write(os.urandom(256 << 10))
        if i == 60:  # ~15 MB written: several parts uploaded (S3), or on disk (local)
            print("WRITING", flush=True)
        if i > 60:
            time.sleep(0.05)
print("DONE", flush=True)
"""


def test_a_sigkill_mid_upload_leaves_no_object_under_the_final_key(location: Location) -> None:
    """A real SIGKILL while the object streams: the final key keeps its previous object (or stays absent),
    and the next writer of the key cleans what the dead one left and puts its object in place."""
    store = location.store
    store.write_bytes(KEY, b"previous version")
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(location.value), KEY],
        stdout=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "WRITING"
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        if child.stdout:
            child.stdout.close()
    assert store.read_bytes(KEY) == b"previous version"  # never a partial object under the final key
    # the other object of the folder is untouched; a killed S3 upload is no object at all (its parts wait
    # for the bucket's AbortIncompleteMultipartUpload rule); a local named temp, if any, is swept next
    assert [k for k in location.objects() if not k.startswith(".") and "/." not in k] == [KEY]
    store.write_bytes(KEY, b"next version")
    assert store.read_bytes(KEY) == b"next version" and _temps(location) == []


def test_the_next_writer_of_a_key_sweeps_what_a_dead_one_left(location: Location) -> None:
    """Killed between the upload and its copy into place (S3), or with no O_TMPFILE (local), a writer leaves
    a temporary object; the next writer of the same key removes it, and only those of that key."""
    store = location.store
    if location.kind == "s3":
        stale = ".tmp/audit_log/.month.parquet-dead0000.part"
        other = ".tmp/audit_log/.other.parquet-dead0000.part"
    else:
        stale, other = "audit_log/.month.parquet-dead0000.part", "audit_log/.other.parquet-dead0000.part"
    for key in (stale, other):
        with store.writer(key, temp_tag="never-swept") as w:
            w.sink.write(b"partial")
    store.write_bytes(KEY, b"whole")
    assert stale not in location.objects() and other in location.objects()
    assert store.read_bytes(KEY) == b"whole"


def test_a_missing_bucket_or_refused_credentials_name_the_setting(
    seaweedfs_server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    with pytest.raises(StorageError) as info:
        open_store("s3://no-such-bucket-ppt/exports", "PERF_PIPELINE_EXPORT_DIR").check()
    assert str(info.value).startswith("PERF_PIPELINE_EXPORT_DIR (s3://no-such-bucket-ppt/exports): bucket")
    assert "does not exist" in str(info.value)

    bucket = seaweedfs_server.create_bucket()  # type: ignore[attr-defined]
    try:
        open_store(f"s3://{bucket}/exports", "PERF_PIPELINE_EXPORT_DIR").check()  # fine
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-wrong-secret-0000")
        with pytest.raises(StorageError, match="credentials were refused") as info:
            open_store(f"s3://{bucket}/exports", "PERF_PIPELINE_EXPORT_DIR").check()
        assert "PERF_PIPELINE_EXPORT_DIR" in str(info.value)
        assert "wrong-secret" not in str(info.value) and secret not in str(info.value)

        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        closed = free_port()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
        started = time.monotonic()
        with pytest.raises(StorageError, match=f"cannot reach bucket .* at http://127.0.0.1:{closed}"):
            open_store(f"s3://{bucket}/exports", "PERF_PIPELINE_EXPORT_DIR").check()
        assert time.monotonic() - started < 30
    finally:
        monkeypatch.undo()
        seaweedfs_server.delete_bucket(bucket)  # type: ignore[attr-defined]


def test_a_local_location_that_cannot_hold_files_names_the_setting(tmp_path: Path) -> None:
    occupied = tmp_path / "a-file"
    occupied.write_text("not a folder")
    with pytest.raises(StorageError, match=r"^PERF_PIPELINE_ARCHIVE_DIR \(.*a-file/archive\): cannot create"):
        open_store(occupied / "archive", "PERF_PIPELINE_ARCHIVE_DIR").check()
    open_store(tmp_path / "new" / "folder", "PERF_PIPELINE_ARCHIVE_DIR").check()  # created, probe gone
    assert list((tmp_path / "new" / "folder").iterdir()) == []
