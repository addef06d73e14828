"""Background exports on a real PostgreSQL: round trips, bad requests, kill + retry, parallel runs, sensor.

The tests that write files run twice: into a local folder and into an S3 bucket (the session's private
SeaweedFS), through the ``location`` fixture.

The module's database holds ~20k audit rows and ~10k usage rows over 10 days (2026-02-20 … 2026-03-01)
plus a few hand-written audit rows with awkward values (quotes, commas, newlines, unicode, NULLs, '',
IPv6, nested JSON). "Today" is pinned to 2026-03-02 so retention checks are deterministic.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pyarrow.parquet as pq
import pytest
from psycopg.types.json import Jsonb

from perf_pipeline.defs.exports.jobs import REQUEST_TAG, export_job
from perf_pipeline.defs.exports.sensors import export_run_failure_sensor, pending_exports_sensor
from perf_pipeline.defs.resources import PostgresResource, SettingsResource
from perf_pipeline.lib import exports as ex
from perf_pipeline.lib.db import Locks
from perf_pipeline.lib.workload import WorkloadSpec, load_workload
from perf_pipeline.settings import PROJECT_ROOT
from perf_pipeline_tests.conftest import Location

END = dt.datetime(2026, 3, 1, 6, tzinfo=dt.UTC)
TODAY = dt.date(2026, 3, 2)
RETENTION = {"audit_log": 12, "usage_log": 24}
REQUESTER = "00000000-0000-4000-8000-000000000001"
ODD_USER = "11111111-2222-4333-8444-555555555555"

ODD_AUDIT_ROWS = [
    # (timestamp, user_id, entity_type, entity_id, event_type, operation, severity, description, details, ip)
    (
        "2026-02-24 10:00:00.5+00",
        ODD_USER,
        "session",
        "s-1",
        "session.export",
        "export",
        "critical",
        'said "hi", then\nleft; émoji ✓ and a \\ backslash',
        {"nested": {"a": [1, 2, None]}, "q": "it's"},
        "2001:db8::1",
    ),
    ("2026-02-24 11:00:00+00", ODD_USER, None, None, "login", "login", "high", "", None, None),
    (
        "2026-02-24 12:00:00+00",
        None,
        "billing",
        "b-9",
        "billing.update",
        "update",
        "high",
        None,
        {},
        "10.0.0.1",
    ),
]


@pytest.fixture(scope="module")
def loaded(db_url: str) -> str:
    load_workload(db_url, WorkloadSpec(days=10, usage_per_day=1000, audit_per_day=2000, end=END))
    with psycopg.connect(db_url, autocommit=True) as conn:
        for row in ODD_AUDIT_ROWS:
            conn.execute(
                "INSERT INTO audit_log (timestamp, user_id, entity_type, entity_id, event_type, operation, severity,"
                " description, details, ip) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (*row[:8], Jsonb(row[8]) if row[8] is not None else None, row[9]),
            )
        conn.execute(
            "INSERT INTO usage_log (user_id, session_id, created_at, duration_minutes, cost_usd, is_billable,"
            " stt_provider) VALUES (%s, NULL, '2026-02-24 13:00+00', 0, 0, false, 'whisper')",
            (ODD_USER,),
        )
    return db_url


def _request(conn: psycopg.Connection, kind: object, fmt: object, filters: object) -> int:
    row = conn.execute(
        "INSERT INTO data_export (requested_by, kind, format, filters) VALUES (%s, %s, %s, %s) RETURNING id",
        (REQUESTER, kind, fmt, Jsonb(filters)),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _execute_job(
    request_id: int, url: str, instance: dg.DagsterInstance, **kwargs: Any
) -> dg.ExecuteInProcessResult:
    """export_job for one request, in process (``kwargs``: ``raise_on_error``, ``tags``)."""
    return export_job.execute_in_process(
        run_config={"ops": {"run_data_export": {"config": {"request_id": request_id}}}},
        resources={"postgres": PostgresResource(url=url), "settings": SettingsResource()},
        instance=instance,
        **kwargs,
    )


def _run(url: str, request_id: int, folder: Path, **kwargs: Any) -> ex.ExportResult:
    return ex.run_export(
        url, request_id, folder, statement_timeout_s=60, retention_months=RETENTION, today=TODAY, **kwargs
    )


# -------------------------------------------------------------------------- independent reading of both sides


def _norm_db(value: Any) -> Any:
    """A value as psycopg returns it, in the comparable form used for files."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if value.__class__.__module__ == "ipaddress":
        return str(value)
    return value


def _expected(conn: psycopg.Connection, kind: str, where: str, params: dict[str, Any]) -> list[tuple]:
    columns = list(ex.KINDS[kind].schema.names)
    select = ", ".join(f'"{c}"' for c in columns)
    rows = conn.execute(f"SELECT {select} FROM {kind} WHERE {where}", params).fetchall()
    return sorted((tuple(_norm_db(v) for v in row) for row in rows), key=lambda r: str(r[0]))


def _from_csv_field(name: str, kind: str, raw: str) -> Any:
    if raw == "":
        return None  # Python's csv module cannot tell NULL from ''; the Parquet test checks that distinction
    typ = str(ex.KINDS[kind].schema.field(name).type)
    if typ.startswith("timestamp"):
        return dt.datetime.fromisoformat(raw)
    if typ.startswith("decimal"):
        return decimal.Decimal(raw)
    if typ == "bool":
        return {"t": True, "f": False}[raw]
    if typ == "int64":
        return int(raw)
    if name == "details":
        return json.dumps(json.loads(raw), sort_keys=True)
    return raw


def _read_file(path: Path, kind: str) -> tuple[list[str], list[tuple]]:
    if path.name.endswith(".csv.gz"):
        csv.field_size_limit(1 << 30)  # audit details can be several MB (the csv module's default is 128 KiB)
        with gzip.open(path, "rt", newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            rows = [
                tuple(_from_csv_field(n, kind, v) for n, v in zip(header, rec, strict=True)) for rec in reader
            ]
    else:
        table = pq.read_table(path)
        header = table.column_names
        rows = []
        for rec in table.to_pylist():
            if "details" in rec and rec["details"] is not None:
                rec["details"] = json.dumps(json.loads(rec["details"]), sort_keys=True)
            rows.append(tuple(rec[n] for n in header))
    return header, sorted(rows, key=lambda r: str(r[0]))


def _csv_blank(rows: list[tuple]) -> list[tuple]:
    return [tuple(None if v == "" else v for v in r) for r in rows]


def _visible(folder: Path | Location) -> list[str]:
    """Every name in the export folder, hidden temporary ones included (every object of an S3 location)."""
    if isinstance(folder, Location):
        return folder.objects()
    return sorted(os.listdir(folder))


def _name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("fmt", ex.FORMATS)
@pytest.mark.parametrize("kind", list(ex.KINDS))
def test_round_trip_every_column(
    loaded: str, db: psycopg.Connection, location: Location, tmp_path: Path, kind: str, fmt: str
) -> None:
    request_id = _request(db, kind, fmt, {"start": "2026-02-22", "end": "2026-02-25"})
    result = _run(loaded, request_id, location.value)
    path = location.fetch(result.uri, tmp_path)

    time_col = ex.KINDS[kind].schema.names[1 if kind == "audit_log" else 3]
    expected = _expected(
        db,
        kind,
        f'"{time_col}" >= %(a)s AND "{time_col}" < %(b)s',
        {"a": dt.datetime(2026, 2, 22, tzinfo=dt.UTC), "b": dt.datetime(2026, 2, 26, tzinfo=dt.UTC)},
    )
    header, got = _read_file(path, kind)
    assert header == list(ex.KINDS[kind].schema.names)
    assert len(expected) > 3000
    assert got == (_csv_blank(expected) if fmt == "csv.gz" else expected)

    data = path.read_bytes()
    req = ex.get_request(db, request_id)
    assert req is not None
    assert req["status"] == "succeeded" and req["error"] is None
    assert (req["rows"], req["bytes"], req["sha256"]) == (
        len(expected),
        len(data),
        hashlib.sha256(data).hexdigest(),
    )
    assert req["file_path"] == result.uri and req["csv_bytes"] > len(expected) * 40
    assert req["file_path"] == location.store.uri(f"export-{request_id}-{kind}.{fmt}")
    assert req["etag"] == location.store.info(_name(result.uri)).etag  # the store's, as written
    assert _visible(location) == [_name(result.uri)]  # no temp names left behind


def test_filters_user_entity_and_severities(loaded: str, db: psycopg.Connection, scratch_dir: Path) -> None:
    filters = {
        "user_id": ODD_USER,
        "start": "2026-02-24",
        "end": "2026-02-24",
        "severity": ["high", "critical"],
    }
    request_id = _request(db, "audit_log", "parquet", filters)
    _, got = _read_file(_run(loaded, request_id, scratch_dir).path, "audit_log")
    assert [r[7] for r in got] == ["critical", "high"] or [r[7] for r in got] == ["high", "critical"]
    odd = {r[8] for r in got}
    assert odd == {ODD_AUDIT_ROWS[0][7], ""}  # Parquet keeps '' apart from NULL, and the awkward text intact
    assert {r[10] for r in got} == {"2001:db8::1", None}

    request_id = _request(
        db,
        "audit_log",
        "csv.gz",
        {"start": "2026-02-24", "end": "2026-02-24", "entity_type": "billing", "severity": "high"},
    )
    result = _run(loaded, request_id, scratch_dir)
    expected = _expected(
        db,
        "audit_log",
        "\"timestamp\" >= '2026-02-24' AND \"timestamp\" < '2026-02-25' AND "
        "entity_type = 'billing' AND severity = 'high'",
        {},
    )
    assert _read_file(result.path, "audit_log")[1] == _csv_blank(expected)
    assert result.rows == len(expected) >= 1


def test_empty_result_gives_valid_files(
    loaded: str, db: psycopg.Connection, location: Location, tmp_path: Path
) -> None:
    for fmt in ex.FORMATS:
        request_id = _request(db, "usage_log", fmt, {"start": "2025-06-01", "end": "2025-06-30"})
        result = _run(loaded, request_id, location.value)
        header, rows = _read_file(location.fetch(result.uri, tmp_path), "usage_log")
        assert (result.rows, rows, header) == (0, [], list(ex.KINDS["usage_log"].schema.names))


def test_date_range_prunes_partitions(loaded: str, db: psycopg.Connection) -> None:
    plan = ex.validate_request(
        1,
        "audit_log",
        "csv.gz",
        {"start": "2026-02-21", "end": "2026-02-23"},
        today=TODAY,
        retention_months=RETENTION,
    )
    text = "\n".join(r[0] for r in db.execute("EXPLAIN " + ex.export_select(db, plan)).fetchall())
    assert "audit_log_y2026m02" in text
    assert "audit_log_y2026m03" not in text and "audit_log_default" not in text


# ------------------------------------------------------------------------------------------- bad requests

BAD_REQUESTS = [
    ("session", "csv.gz", {}, "unknown kind 'session'"),
    ("audit_log", "xlsx", {}, "unknown format 'xlsx'"),
    (
        "audit_log",
        "csv.gz",
        {"stt_provider": "google"},
        "unknown filter key(s) for audit_log: 'stt_provider'",
    ),
    ("usage_log", "csv.gz", {"severity": "high"}, "unknown filter key(s) for usage_log: 'severity'"),
    (
        "audit_log",
        "csv.gz",
        {"start": "2026-02-25", "end": "2026-02-21"},
        "start 2026-02-25 is after end 2026-02-21",
    ),
    ("audit_log", "csv.gz", {"start": "2020-01-01"}, "beyond the retention of audit_log"),
    ("usage_log", "parquet", {"start": "2023-12-31"}, "beyond the retention of usage_log"),
    ("audit_log", "csv.gz", {"user_id": 42}, "'user_id' must be a UUID string"),
    ("audit_log", "csv.gz", {"start": 20260201}, "'start' must be a date string"),
    ("audit_log", "csv.gz", {"end": "2026-02-30"}, "'end' is not a valid date"),
    ("audit_log", "csv.gz", {"severity": "urgent"}, "unknown value(s) ['urgent']"),
    ("audit_log", "csv.gz", {"severity": []}, "non-empty list"),
    ("audit_log", "csv.gz", ["start", "2026-02-01"], "filters must be a JSON object"),
    ("audit_log", "csv.gz", {"user_id": "' OR 1=1; DROP TABLE audit_log; --"}, "'user_id' is not a UUID"),
    (
        "audit_log",
        "csv.gz",
        {"entity_type": "session' OR '1'='1"},
        "'entity_type' must be a lowercase identifier",
    ),
    (
        "audit_log",
        "csv.gz",
        {"start": "2026-02-01'); DROP TABLE audit_log; --"},
        "'start' must be a date string",
    ),
]


@pytest.mark.parametrize(
    ("kind", "fmt", "filters", "message"),
    BAD_REQUESTS,
    ids=[f"{i:02d}-{m.split()[0]}-{m.split()[1]}" for i, (*_, m) in enumerate(BAD_REQUESTS)],
)
def test_bad_request_fails_with_reason_and_no_file(
    loaded: str,
    db: psycopg.Connection,
    scratch_dir: Path,
    kind: object,
    fmt: object,
    filters: object,
    message: str,
) -> None:
    before = db.execute("SELECT count(*) FROM audit_log").fetchone()
    request_id = _request(db, kind, fmt, filters)
    with pytest.raises(ex.ExportRequestError) as info:
        _run(loaded, request_id, scratch_dir)
    assert message in str(info.value)
    req = ex.get_request(db, request_id)
    assert req is not None and req["status"] == "failed" and message in req["error"]
    assert req["file_path"] is None and _visible(scratch_dir) == []
    assert db.execute("SELECT count(*) FROM audit_log").fetchone() == before  # injections did nothing


def test_quoted_values_cannot_escape_even_unvalidated(loaded: str, db: psycopg.Connection) -> None:
    # defense in depth: values are merged as quoted literals, so even a plan that skipped validation is inert
    plan = ex.ExportPlan(
        1,
        "audit_log",
        "csv.gz",
        dt.datetime(2026, 2, 1, tzinfo=dt.UTC),
        dt.datetime(2026, 3, 2, tzinfo=dt.UTC),
        entity_type="x' OR '1'='1'; DROP TABLE audit_log; --",
        severities=("low'); DROP TABLE audit_log; --",),
    )
    assert db.execute(ex.export_select(db, plan)).fetchall() == []
    assert db.execute("SELECT count(*) > 0 FROM audit_log").fetchone() == (True,)


# ---------------------------------------------------------------------------------- failures and retries

_KILL_CHILD = textwrap.dedent("""
    import datetime as dt, sys, time
    from perf_pipeline.lib import exports as ex

    def stall(progress):
        print("STREAMING", progress.csv_bytes, flush=True)
        time.sleep(120)

    ex.run_export(sys.argv[1], int(sys.argv[2]), sys.argv[3], statement_timeout_s=60,
                  retention_months={"audit_log": 12, "usage_log": 24}, today=dt.date(2026, 3, 2),
                  progress=stall, progress_every_bytes=1)
""")


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_kill_mid_export_leaves_no_file_and_retry_succeeds(
    loaded: str, db: psycopg.Connection, location: Location, fmt: str
) -> None:
    scratch_dir = location.value
    request_id = _request(db, "audit_log", fmt, {"start": "2026-02-20"})
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, loaded, str(request_id), str(scratch_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
    )
    try:
        line = child.stdout.readline() if child.stdout else ""
        assert line.startswith("STREAMING"), f"child did not start streaming: {line!r}"
        assert 0 < int(line.split()[1]) < 4_000_000  # really mid-stream, not at the end
        assert ex.get_request(db, request_id)["status"] == "running"  # type: ignore[index]
        with pytest.raises(ex.ExportBusyError):  # a second process cannot run the same request meanwhile
            _run(loaded, request_id, scratch_dir)
        assert _visible(location) == []  # the data being written has no name yet
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        if child.stdout:
            child.stdout.close()
    assert _visible(location) == []  # SIGKILL: nothing to clean, nothing partial visible
    if isinstance(scratch_dir, Path):
        (scratch_dir / f".export-{request_id}-dead.part").write_bytes(
            b"partial"
        )  # as a non-O_TMPFILE fs leaves
    else:  # as a writer killed between its upload and the copy into place leaves
        location.store.write_bytes(f".tmp/.export-{request_id}-dead.part", b"partial")

    result = _run(loaded, request_id, scratch_dir)  # the retry
    req = ex.get_request(db, request_id)
    assert req is not None and req["status"] == "succeeded" and req["attempts"] == 2
    expected = db.execute("SELECT count(*) FROM audit_log WHERE timestamp >= '2026-02-20'").fetchone()
    assert (result.rows,) == expected
    assert _visible(location) == [_name(result.uri)]


def test_failure_after_some_batches_leaves_no_file_and_retry_succeeds(
    loaded: str, db: psycopg.Connection, location: Location
) -> None:
    scratch_dir = location.value
    request_id = _request(db, "usage_log", "parquet", {"start": "2026-02-20"})

    def explode(progress: ex.Progress) -> None:
        raise RuntimeError(f"injected failure after {progress.csv_bytes} bytes")

    with pytest.raises(RuntimeError, match="injected failure"):
        _run(loaded, request_id, scratch_dir, progress=explode, progress_every_bytes=100_000)
    req = ex.get_request(db, request_id)
    assert req is not None and req["status"] == "failed" and "RuntimeError: injected failure" in req["error"]
    assert _visible(location) == []

    result = _run(loaded, request_id, scratch_dir)
    assert ex.get_request(db, request_id)["status"] == "succeeded"  # type: ignore[index]
    assert (
        result.rows
        == db.execute("SELECT count(*) FROM usage_log WHERE created_at >= '2026-02-20'").fetchone()[0]
    )
    assert _visible(location) == [_name(result.uri)]


def test_export_does_not_queue_behind_ddl(loaded: str, db: psycopg.Connection, scratch_dir: Path) -> None:
    request_id = _request(db, "audit_log", "csv.gz", {"start": "2026-02-20"})
    with psycopg.connect(loaded) as ddl:
        ddl.execute("LOCK TABLE audit_log_y2026m02 IN ACCESS EXCLUSIVE MODE")  # e.g. a detach in progress
        with pytest.raises(psycopg.errors.LockNotAvailable):
            _run(loaded, request_id, scratch_dir)
        ddl.rollback()
    req = ex.get_request(db, request_id)
    assert req is not None and req["status"] == "failed" and "LockNotAvailable" in req["error"]
    assert _visible(scratch_dir) == []


def test_statement_timeout_bounds_the_copy(loaded: str, db: psycopg.Connection, scratch_dir: Path) -> None:
    request_id = _request(db, "audit_log", "parquet", {"start": "2026-02-20"})
    with psycopg.connect(loaded) as ddl:
        ddl.execute("LOCK TABLE audit_log_y2026m02 IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):  # 1 s < lock_timeout 2 s
            ex.run_export(
                loaded,
                request_id,
                scratch_dir,
                statement_timeout_s=1,
                retention_months=RETENTION,
                today=TODAY,
            )
        ddl.rollback()
    req = ex.get_request(db, request_id)
    assert req is not None and req["status"] == "failed" and "statement timeout" in req["error"]
    assert _visible(scratch_dir) == []


def test_without_o_tmpfile_a_hidden_named_temp_is_used(
    loaded: str, db: psycopg.Connection, scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "O_TMPFILE")  # as on a filesystem or platform without it
    seen: list[list[str]] = []
    request_id = _request(db, "usage_log", "csv.gz", {"start": "2026-02-20"})
    result = _run(
        loaded,
        request_id,
        scratch_dir,
        progress=lambda p: seen.append(_visible(scratch_dir)),
        progress_every_bytes=1,
    )
    *streaming, final = seen  # the last report comes once the file is in place
    assert streaming and all(len(n) == 1 and n[0].startswith(f".export-{request_id}-") for n in streaming)
    assert final == _visible(scratch_dir) == [result.path.name]

    def explode(progress: ex.Progress) -> None:
        raise RuntimeError("injected")

    request_id = _request(db, "usage_log", "csv.gz", {"start": "2026-02-20"})
    with pytest.raises(RuntimeError):
        _run(loaded, request_id, scratch_dir, progress=explode, progress_every_bytes=1)
    assert _visible(scratch_dir) == [result.path.name]  # the failed attempt's temp file is gone


def test_two_requests_in_parallel_both_succeed(
    loaded: str, db: psycopg.Connection, location: Location
) -> None:
    scratch_dir = location.value
    ids = [
        _request(db, "audit_log", "csv.gz", {"start": "2026-02-20"}),
        _request(db, "usage_log", "parquet", {"start": "2026-02-20"}),
    ]
    results: dict[int, ex.ExportResult] = {}
    errors: list[BaseException] = []

    def work(request_id: int) -> None:
        try:
            results[request_id] = _run(loaded, request_id, scratch_dir)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    counts = [
        db.execute(f"SELECT count(*) FROM {k} WHERE {c} >= '2026-02-20'").fetchone()[0]
        for k, c in (("audit_log", "timestamp"), ("usage_log", "created_at"))
    ]
    assert [results[i].rows for i in ids] == counts
    assert all(ex.get_request(db, i)["status"] == "succeeded" for i in ids)  # type: ignore[index]
    assert _visible(location) == sorted(_name(r.uri) for r in results.values())


def test_late_failure_notice_does_not_fail_a_newer_attempt(db: psycopg.Connection) -> None:
    request_id = _request(db, "audit_log", "csv.gz", {})
    db.execute("UPDATE data_export SET status = 'running', run_id = 'new-run' WHERE id = %s", (request_id,))
    assert not ex.mark_run_ended(db, request_id, "old-run", "old run failed")
    assert not ex.mark_run_ended(db, request_id, ["retry-of-old-run", "old-run"], "old lineage failed")
    assert ex.mark_run_ended(db, request_id, ["retry-of-new-run", "new-run"], "retry of new run failed")
    assert ex.get_request(db, request_id)["error"] == "retry of new run failed"  # type: ignore[index]


def test_a_retry_waits_for_the_earlier_attempt_and_takes_its_result(
    loaded: str, db: psycopg.Connection, scratch_dir: Path
) -> None:
    """An attempt still running when its retry starts: the retry waits for the request's lock instead of
    failing "busy", then returns what the first attempt recorded: one export, one file, attempts 1."""
    request_id = _request(db, "usage_log", "csv.gz", {"start": "2026-02-20"})
    first: dict[str, Any] = {}

    def first_attempt() -> None:
        try:
            first["result"] = _run(loaded, request_id, scratch_dir, max_mb_per_s=0.5)  # ~1.3 MB: ~2.6 s
        except BaseException as exc:
            first["error"] = exc

    thread = threading.Thread(target=first_attempt)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while ex.get_request(db, request_id)["status"] != "running":  # type: ignore[index]
            assert time.monotonic() < deadline, "the first attempt did not start"
            time.sleep(0.02)
        waited: list[float] = []
        started = time.monotonic()
        retry = _run(
            loaded,
            request_id,
            scratch_dir,
            lock_wait_s=60,
            on_lock_wait=lambda: waited.append(time.monotonic()),
        )
        waited_s = time.monotonic() - started
    finally:
        thread.join(timeout=120)
    assert "error" not in first, first.get("error")
    assert waited and waited_s > 1.0  # it did wait for the first attempt
    req = ex.get_request(db, request_id)
    assert req is not None and req["status"] == "succeeded" and req["attempts"] == 1
    assert (retry.rows, retry.sha256, retry.path) == (
        first["result"].rows,
        req["sha256"],
        first["result"].path,
    )
    assert retry.seconds == 0.0  # returned as recorded, not exported again
    assert _visible(scratch_dir) == [first["result"].path.name]


def test_a_request_still_held_after_the_wait_is_busy(
    loaded: str, db: psycopg.Connection, scratch_dir: Path
) -> None:
    request_id = _request(db, "usage_log", "csv.gz", {"start": "2026-02-28"})
    with psycopg.connect(loaded, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (Locks.EXPORT_CLASS, request_id))
        started = time.monotonic()
        with pytest.raises(ex.ExportBusyError):
            _run(loaded, request_id, scratch_dir, lock_wait_s=0.5)
        assert 0.5 <= time.monotonic() - started < 5
        holder.execute("SELECT pg_advisory_unlock(%s, %s)", (Locks.EXPORT_CLASS, request_id))
    assert ex.get_request(db, request_id)["status"] == "pending"  # type: ignore[index]  # untouched
    assert _run(loaded, request_id, scratch_dir, lock_wait_s=0.5).status == "succeeded"  # lock released


# ------------------------------------------------------------------------------------------ Dagster layer


def test_sensor_launches_each_pending_request_once(loaded: str, db: psycopg.Connection) -> None:
    db.execute(
        "UPDATE data_export SET status = 'failed' WHERE status = 'pending'"
    )  # earlier tests' leftovers
    instance = dg.DagsterInstance.ephemeral()
    postgres = PostgresResource(url=loaded)

    def tick(cursor: str | None) -> dg.SensorResult:
        ctx = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"postgres": postgres, "settings": SettingsResource()}
        )
        result = pending_exports_sensor(ctx)
        assert isinstance(result, dg.SensorResult)
        return result

    a = _request(db, "audit_log", "csv.gz", {"start": "2026-02-25"})
    b = _request(db, "usage_log", "parquet", {})
    bad = _request(db, "audit_log", "csv.gz", {"entity_type": "x'; DROP TABLE audit_log; --"})
    odd = _request(db, "audit_log", "csv.gz", "not an object")
    first = tick(None)
    assert [r.run_key for r in first.run_requests or []] == [str(a), str(b)]
    assert first.run_requests[0].run_config == {"ops": {"run_data_export": {"config": {"request_id": a}}}}
    req = ex.get_request(db, bad)
    assert req is not None and req["status"] == "failed" and "entity_type" in req["error"]
    req = ex.get_request(db, odd)
    assert req is not None and req["status"] == "failed" and "filters must be a JSON object" in req["error"]

    second = tick(first.cursor)  # a and b still pending (queued behind the pool): not yielded again
    assert not second.run_requests
    c = _request(db, "audit_log", "parquet", {})
    third = tick(second.cursor)
    assert [r.run_key for r in third.run_requests or []] == [str(c)]

    db.execute("UPDATE data_export SET status = 'running' WHERE id = %s", (a,))
    fourth = tick(third.cursor)
    assert not fourth.run_requests
    assert json.loads(fourth.cursor or "{}")["launched"] == [b, c]  # the cursor forgets what started
    keys = [r.run_key for t in (first, second, third, fourth) for r in t.run_requests or []]
    assert len(keys) == len(set(keys)) == 3


DEEP = '{"a":' * 3000 + "1" + "}" * 3000  # valid jsonb, deeper than Python's json loader goes
#: (kind, format, filters as JSON text, a fragment of the reason): what a client could write into the table
RAW_BAD_REQUESTS = [
    ("audit_log", "csv.gz", '{"end": "9999-12-31"}', "dates must be between"),
    ("usage_log", "parquet", '{"start": "0001-01-01"}', "dates must be between"),
    ("audit_log", "csv.gz", '{"start": "0001-01-01", "end": "9999-12-31"}', "dates must be between"),
    ("audit_log", "csv.gz", '{"end": "0001-01-01"}', "dates must be between"),
    ("audit_log", "csv.gz", '{"start": "9999-12-31"}', "dates must be between"),
    ("audit_log", "csv.gz", '{"end": "0000-01-01"}', "'end' is not a valid date"),
    ("audit_log", "csv.gz", '{"start": "\u0662\u0660\u0662\u0666-\u0660\u0662-\u0662\u0660"}', "date string"),
    ("audit_log", "csv.gz", '{"start": ""}', "'start' must be a date string"),
    ("audit_log", "csv.gz", '{"start": ["2026-02-01"]}', "'start' must be a date string"),
    ("audit_log", "csv.gz", '{"end": {"$gt": "2026-01-01"}}', "'end' must be a date string"),
    ("audit_log", "csv.gz", "null", "filters must be a JSON object, got null"),
    ("audit_log", "csv.gz", "42", "filters must be a JSON object"),
    ("audit_log", "csv.gz", '"start=2026-01-01"', "filters must be a JSON object"),
    ("audit_log", "csv.gz", "true", "filters must be a JSON object"),
    ("audit_log", "csv.gz", "[]", "filters must be a JSON object"),
    ("audit_log", "csv.gz", DEEP, "nested too deeply"),
    ("audit_log", "csv.gz", '{"user_id": "' + "x" * 1_000_000 + '"}', "'user_id' is not a UUID"),
    ("audit_log", "csv.gz", '{"user_id": {"$ne": null}}', "'user_id' must be a UUID string"),
    ("audit_log", "csv.gz", '{"user_id": true}', "'user_id' must be a UUID string"),
    ("audit_log", "csv.gz", '{"severity": [["high"]]}', "'severity' must be a severity"),
    ("audit_log", "csv.gz", '{"severity": {"a": 1}}', "'severity' must be a severity"),
    ("audit_log", "csv.gz", '{"severity": 1e400}', "'severity' must be a severity"),
    ("audit_log", "csv.gz", '{"entity_type": "abc\\n"}', "'entity_type' must be a lowercase identifier"),
    ("audit_log", "csv.gz", '{"entity_type": "' + "a" * 100_000 + '"}', "'entity_type' must be a lowercase"),
    ("audit_log", "csv.gz", '{"": 1}', "unknown filter key(s) for audit_log: ''"),
    ("audit_log", "csv.gz", '{"' + "k" * 100_000 + '": 1}', "unknown filter key(s) for audit_log"),
    ("x" * 100_000, "csv.gz", "{}", "unknown kind 'xxxx"),
    ("", "csv.gz", "{}", "unknown kind ''"),
    ("AUDIT_LOG", "csv.gz", "{}", "unknown kind 'AUDIT_LOG'"),
    ("audit_log", "y" * 100_000, "{}", "unknown format 'yyyy"),
    ("audit_log", "CSV.GZ", "{}", "unknown format 'CSV.GZ'"),
]


def _raw_request(conn: psycopg.Connection, kind: str, fmt: str, filters_json: str) -> int:
    row = conn.execute(
        "INSERT INTO data_export (requested_by, kind, format, filters) VALUES (%s, %s, %s, %s::jsonb) "
        "RETURNING id",
        (REQUESTER, kind, fmt, filters_json),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_bad_rows_are_failed_and_the_sensor_launches_the_good_ones(
    loaded: str, db: psycopg.Connection
) -> None:
    """One tick over a table holding every kind of bad request a client could write directly (absurd dates,
    filters of any JSON shape, huge strings, wrong types) and good ones: each bad one ends ``failed`` with a
    short reason, the good ones get their run. Before: OverflowError (9999-12-31) or RecursionError (deep
    JSON) on every tick, so nothing behind them was ever launched."""
    db.execute(
        "UPDATE data_export SET status = 'failed' WHERE status = 'pending'"
    )  # earlier tests' leftovers
    today = dt.datetime.now(dt.UTC).date()
    bad = {_raw_request(db, k, f, flt): m for k, f, flt, m in RAW_BAD_REQUESTS}
    good = [
        _request(db, "audit_log", "csv.gz", {"start": str(today - dt.timedelta(days=3))}),
        _request(db, "usage_log", "parquet", {}),
        _request(db, "audit_log", "parquet", {"end": str(today), "severity": ["high", "critical"]}),
    ]
    ctx = dg.build_sensor_context(
        instance=dg.DagsterInstance.ephemeral(),
        resources={"postgres": PostgresResource(url=loaded), "settings": SettingsResource()},
    )
    result = pending_exports_sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    assert sorted(int(r.run_key) for r in result.run_requests or []) == good
    for request_id, fragment in bad.items():
        req = ex.get_request(db, request_id)
        assert req is not None and req["status"] == "failed", (fragment, req and req["status"])
        assert fragment in req["error"] and len(req["error"]) < 600, req["error"][:600]
        assert req["finished_at"] is not None and req["run_id"] is None
    floor = ex.retention_floor(today, 12)
    (error,) = db.execute("SELECT error FROM data_export WHERE id = %s", (min(bad),)).fetchone()
    assert f"between {floor} and {today + dt.timedelta(days=1)}" in error  # the accepted range, stated


def test_the_sensor_fails_a_request_it_cannot_check_and_goes_on(
    loaded: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error while checking one request (a bug, not a bad value) fails that request with the
    reason; the tick goes on with the others."""
    import perf_pipeline.defs.exports.sensors as sensors

    db.execute("UPDATE data_export SET status = 'failed' WHERE status = 'pending'")
    first = _request(db, "usage_log", "csv.gz", {})
    second = _request(db, "usage_log", "parquet", {})
    real = sensors.validate_request

    def flaky(request_id: int, *args: Any, **kwargs: Any) -> ex.ExportPlan:
        if request_id == first:
            raise ZeroDivisionError("injected")
        return real(request_id, *args, **kwargs)

    monkeypatch.setattr(sensors, "validate_request", flaky)
    ctx = dg.build_sensor_context(
        instance=dg.DagsterInstance.ephemeral(),
        resources={"postgres": PostgresResource(url=loaded), "settings": SettingsResource()},
    )
    result = pending_exports_sensor(ctx)
    assert [r.run_key for r in result.run_requests or []] == [str(second)]  # type: ignore[union-attr]
    req = ex.get_request(db, first)
    assert req is not None and req["status"] == "failed" and "ZeroDivisionError: injected" in req["error"]


def test_export_job_run_records_file_and_metadata(
    loaded: str, db: psycopg.Connection, location: Location, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERF_PIPELINE_EXPORT_DIR", str(location.value))
    (op,) = export_job.graph.node_defs
    assert op.pool == "exports"  # the pool whose limit caps concurrent exports
    instance = dg.DagsterInstance.ephemeral()
    monkeypatch.setenv("PERF_PIPELINE_USAGE_RETENTION_MONTHS", "600")  # the job uses the real today
    good = _request(db, "usage_log", "csv.gz", {"start": "2026-02-20"})
    result = _execute_job(good, loaded, instance)
    assert result.success
    (mat,) = result.asset_materializations_for_node("run_data_export")
    req = ex.get_request(db, good)
    assert req is not None and req["status"] == "succeeded" and req["run_id"] == result.run_id
    assert mat.metadata["rows"].value == req["rows"] > 9000 and mat.metadata["bytes"].value == req["bytes"]
    assert req["file_path"] == location.store.uri(f"export-{good}-usage_log.csv.gz")
    assert mat.metadata["etag"].value == req["etag"] == location.store.info(_name(req["file_path"])).etag

    bad = _request(db, "audit_log", "csv.gz", {"start": "1999-01-01"})
    failed = _execute_job(bad, loaded, instance, raise_on_error=False)
    assert not failed.success
    req = ex.get_request(db, bad)
    assert req is not None and req["status"] == "failed" and "retention" in req["error"]


def test_run_failure_sensor_fails_the_request_of_a_dead_run(loaded: str, db: psycopg.Connection) -> None:
    instance = dg.DagsterInstance.ephemeral()
    postgres = PostgresResource(url=loaded)
    request_id = _request(db, "audit_log", "csv.gz", {"start": "1999-01-01"})
    run = _execute_job(
        request_id, loaded, instance, raise_on_error=False, tags={REQUEST_TAG: str(request_id)}
    )
    assert not run.success
    # as if the run's process had died mid-export: the request still says running, claimed by that run
    db.execute(
        "UPDATE data_export SET status = 'running', error = NULL, run_id = %s WHERE id = %s",
        (run.run_id, request_id),
    )
    ctx = dg.build_run_status_sensor_context(
        sensor_name="export_run_failure_sensor",
        dagster_event=run.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=run.dagster_run,
        resources={"postgres": postgres},
    ).for_run_failure()
    export_run_failure_sensor(ctx)
    req = ex.get_request(db, request_id)
    assert (
        req is not None and req["status"] == "failed" and f"Dagster run {run.run_id} failed" in req["error"]
    )


def _retrying_instance() -> Any:
    """A Dagster instance with this repo's dagster.yaml run_retries settings (storage: a temp folder)."""
    import yaml

    settings = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    assert settings["run_retries"]["enabled"] is True
    return dg.instance_for_test(overrides={"run_retries": settings["run_retries"]})


def _failure_sensor_on(instance: Any, run: dg.DagsterRun, postgres: PostgresResource) -> None:
    (failure,) = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    ctx = dg.build_run_status_sensor_context(
        sensor_name="export_run_failure_sensor",
        dagster_event=failure.dagster_event,
        dagster_instance=instance,
        dagster_run=instance.get_run_by_id(run.run_id),
        resources={"postgres": postgres},
    ).for_run_failure()
    export_run_failure_sensor(ctx)


def test_a_dead_run_worker_is_retried_and_its_request_left_to_the_retry(
    loaded: str, db: psycopg.Connection
) -> None:
    """Dagster's own decision, on an instance with this repo's run_retries: a run marked failed from outside
    (what the code server reports when the run worker dies) will be retried, so the failure sensor leaves
    its request to the retry; when the retry dies too (no retry left), the request is failed even though
    it is still claimed by the first run."""
    postgres = PostgresResource(url=loaded)
    request_id = _request(db, "audit_log", "csv.gz", {"start": "2026-02-28"})
    config = {"ops": {"run_data_export": {"config": {"request_id": request_id}}}}
    tags = {**export_job.tags, REQUEST_TAG: str(request_id)}
    with _retrying_instance() as instance:
        run = instance.create_run_for_job(export_job, run_config=config, tags=tags)
        db.execute(
            "UPDATE data_export SET status = 'running', run_id = %s WHERE id = %s", (run.run_id, request_id)
        )
        instance.report_run_failed(run)  # as DagsterApiServer does for a run worker killed by a signal
        failed = instance.get_run_by_id(run.run_id)
        assert failed is not None and failed.tags.get("dagster/will_retry") == "true"
        assert "dagster/failure_reason" not in failed.tags  # not a step failure
        _failure_sensor_on(instance, run, postgres)
        assert ex.get_request(db, request_id)["status"] == "running"  # type: ignore[index]

        lineage = {"dagster/parent_run_id": run.run_id, "dagster/root_run_id": run.run_id}
        retry = instance.create_run_for_job(
            export_job,
            run_config=config,
            tags={**tags, **lineage, "dagster/retry_number": "1"},
            parent_run_id=run.run_id,
            root_run_id=run.run_id,
        )
        instance.report_run_failed(retry)  # the retry's worker died before its op claimed the request
        assert instance.get_run_by_id(retry.run_id).tags.get("dagster/will_retry") == "false"  # type: ignore[union-attr]
        _failure_sensor_on(instance, retry, postgres)
    req = ex.get_request(db, request_id)
    assert (
        req is not None and req["status"] == "failed" and f"Dagster run {retry.run_id} failed" in req["error"]
    )


def _sensor_tick(instance: Any, url: str, cursor: str | None = None) -> dg.SensorResult:
    ctx = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"postgres": PostgresResource(url=url), "settings": SettingsResource()},
    )
    result = pending_exports_sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    return result


def test_a_retry_that_never_launches_leaves_the_request_to_the_sweep(
    loaded: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run worker died after claiming the request; Dagster tagged the run will_retry=true, so the failure
    sensor left the request to the retry, but no retry was ever launched. The pending sensor re-queues the
    request once its worker has been gone for the grace, with a new run key, and a late failure notice of the
    dead run does not fail the re-queued request. While a retry is queued, the request is left to it."""
    import perf_pipeline.defs.exports.sensors as sensors

    monkeypatch.setattr(sensors, "ORPHAN_GRACE_S", 0.0, raising=False)
    db.execute("UPDATE data_export SET status = 'failed' WHERE status IN ('pending', 'running')")
    postgres = PostgresResource(url=loaded)
    with _retrying_instance() as instance:

        def killed_after_claim(request_id: int) -> dg.DagsterRun:
            config = {"ops": {"run_data_export": {"config": {"request_id": request_id}}}}
            tags = {**export_job.tags, REQUEST_TAG: str(request_id), "perf_pipeline/export_attempts": "0"}
            run = instance.create_run_for_job(export_job, run_config=config, tags=tags)
            db.execute(  # what run_export's claim writes; the worker then dies (its lock goes with it)
                "UPDATE data_export SET status = 'running', attempts = 1, started_at = now(), run_id = %s "
                "WHERE id = %s",
                (run.run_id, request_id),
            )
            instance.report_run_failed(run)
            assert instance.get_run_by_id(run.run_id).tags.get("dagster/will_retry") == "true"
            _failure_sensor_on(instance, run, postgres)  # leaves the request to the retry
            assert ex.get_request(db, request_id)["status"] == "running"  # type: ignore[index]
            return run

        # a retry on its way (queued): the request is left to it
        waiting = _request(db, "audit_log", "csv.gz", {"start": "2026-02-28"})
        first = killed_after_claim(waiting)
        instance.create_run_for_job(
            export_job,
            run_config={"ops": {"run_data_export": {"config": {"request_id": waiting}}}},
            tags={**first.tags, "dagster/retry_number": "1"},
            parent_run_id=first.run_id,
            root_run_id=first.run_id,
        )
        result = _sensor_tick(instance, loaded)
        assert not result.run_requests and ex.get_request(db, waiting)["status"] == "running"  # type: ignore[index]
        monkeypatch.setattr(sensors, "ORPHAN_DEFER_MAX_S", 0.0, raising=False)  # ... for a bounded time
        result = _sensor_tick(instance, loaded, result.cursor)
        assert [r.run_key for r in result.run_requests or []] == [f"{waiting}-attempt-2"]

        # no retry ever launched
        request_id = _request(db, "audit_log", "csv.gz", {"start": "2026-02-28"})
        dead = killed_after_claim(request_id)
        result = _sensor_tick(instance, loaded, result.cursor)
        (run,) = result.run_requests or []
        assert run.run_key == f"{request_id}-attempt-2" and run.tags["perf_pipeline/export_attempts"] == "1"
        req = ex.get_request(db, request_id)
        assert req is not None and req["status"] == "pending" and req["run_id"] is None
        assert f"attempt 1 (run {dead.run_id}) stopped without recording a result" in req["error"]

    # a late notice about the dead run does not fail the re-queued request; the new run's own does
    assert not ex.mark_run_ended(db, request_id, [dead.run_id], "late notice", launched_at_attempts=0)
    assert ex.get_request(db, request_id)["status"] == "pending"  # type: ignore[index]
    assert ex.mark_run_ended(
        db, request_id, ["new-run"], "the new run failed to start", launched_at_attempts=1
    )
    assert ex.get_request(db, request_id)["status"] == "failed"  # type: ignore[index]


def test_a_bad_request_fails_its_run_without_a_retry(loaded: str, db: psycopg.Connection) -> None:
    """An op that fails for a recorded reason is a step failure: with retry_on_asset_or_op_failure false
    Dagster marks the run will_retry=false, and the failure sensor fails the request."""
    postgres = PostgresResource(url=loaded)
    request_id = _request(db, "audit_log", "csv.gz", {"start": "1999-01-01"})
    with _retrying_instance() as instance:
        result = _execute_job(
            request_id, loaded, instance, raise_on_error=False, tags={REQUEST_TAG: str(request_id)}
        )
        assert not result.success
        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.tags["dagster/max_retries"] == "1"
        assert run.tags.get("dagster/failure_reason") == "STEP_FAILURE"
        assert run.tags.get("dagster/will_retry") == "false"
        _failure_sensor_on(instance, run, postgres)
    req = ex.get_request(db, request_id)
    assert req is not None and req["status"] == "failed" and "retention" in req["error"]


def test_a_lost_connection_retries_the_step_in_the_same_run(
    loaded: str, db: psycopg.Connection, scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export's backend terminated mid-COPY (as by a PostgreSQL restart): the op asks Dagster to retry
    the step, the second attempt claims the same request and finishes it."""
    import perf_pipeline.defs.exports.jobs as jobs

    monkeypatch.setattr(jobs, "TRANSIENT_RETRY_WAIT_S", 0.2)
    monkeypatch.setenv("PERF_PIPELINE_EXPORT_DIR", str(scratch_dir))
    monkeypatch.setenv("PERF_PIPELINE_EXPORT_MAX_MB_S", "1")  # ~5 MB of CSV: ~5 s per attempt
    monkeypatch.setenv("PERF_PIPELINE_AUDIT_RETENTION_MONTHS", "600")  # the job uses the real today
    request_id = _request(db, "audit_log", "parquet", {"start": "2026-02-20"})
    terminated: list[int] = []

    def terminate_once() -> None:
        deadline = time.monotonic() + 60
        with psycopg.connect(loaded, autocommit=True) as conn:
            while not terminated and time.monotonic() < deadline:
                # the COPY is 'active' while the server still produces, then 'idle in transaction' while
                # the paced client drains the socket buffers (several MB on a fast machine): both are mid-stream
                row = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'perf_pipeline.export' "
                    "AND query LIKE 'COPY%%' AND state IN ('active', 'idle in transaction') "
                    "AND datname = current_database()"
                ).fetchone()
                if row:
                    time.sleep(0.5)  # mid-stream
                    conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                    terminated.append(row[0])
                time.sleep(0.05)

    killer = threading.Thread(target=terminate_once)
    killer.start()
    result = _execute_job(request_id, loaded, dg.DagsterInstance.ephemeral(), raise_on_error=False)
    killer.join(timeout=60)
    assert terminated, "no export backend was terminated"
    assert result.success
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == 1
    req = ex.get_request(db, request_id)
    assert req is not None and req["status"] == "succeeded" and req["attempts"] == 2
    expected = db.execute("SELECT count(*) FROM audit_log WHERE timestamp >= '2026-02-20'").fetchone()
    assert (req["rows"],) == expected and _visible(scratch_dir) == [Path(req["file_path"]).name]


def test_cli_request_status_run(cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    start = str(dt.date.today() - dt.timedelta(days=3))
    assert (
        cli(
            [
                "export",
                "request",
                "--requested-by",
                REQUESTER,
                "--kind",
                "audit_log",
                "--format",
                "parquet",
                "--start",
                start,
                "--severity",
                "critical",
            ]
        )
        == 0
    )
    request_id = int(capsys.readouterr().out.strip())
    assert cli(["export", "status", str(request_id)]) == 0
    assert "status: pending" in capsys.readouterr().out
    assert cli(["export", "run", str(request_id)]) == 0
    assert cli(["export", "status", str(request_id)]) == 0
    out = capsys.readouterr().out
    assert "status: succeeded" in out and "sha256: " in out
    assert (
        cli(["export", "request", "--requested-by", REQUESTER, "--kind", "usage_log", "--severity", "high"])
        == 2
    )
    assert "unknown filter key" in capsys.readouterr().err
    assert cli(["export", "status", "999999"]) == 1


@pytest.fixture
def cli(loaded: str, scratch_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``perf_pipeline.cli.main`` configured for the loaded database, exports into ``scratch_dir``."""
    from perf_pipeline.cli import main

    monkeypatch.setenv("PERF_PIPELINE_DATABASE_URL", loaded)
    monkeypatch.setenv(
        "PERF_PIPELINE_REDIS_URL", "redis://127.0.0.1:1/0"
    )  # not used; keeps embedded Redis off
    monkeypatch.setenv("PERF_PIPELINE_EXPORT_DIR", str(scratch_dir))
    return main


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--kind", "audit_log", "--end", "9999-12-31"], "dates must be between"),
        (["--kind", "audit_log", "--start", "0001-01-01"], "dates must be between"),
        (["--kind", "usage_log", "--start", "0001-01-01", "--end", "9999-12-31"], "dates must be between"),
        (["--kind", "audit_log", "--end", "2026-02-30"], "'end' is not a valid date"),
        (["--kind", "audit_log", "--user-id", "x" * 10_000], "'user_id' is not a UUID"),
        (["--kind", "k" * 10_000], "unknown kind 'kkkk"),
        (["--kind", "audit_log", "--format", "xlsx"], "unknown format 'xlsx'"),
    ],
    ids=["end-9999", "start-0001", "both-absurd", "end-invalid", "huge-user", "huge-kind", "format"],
)
def test_cli_refuses_a_bad_request_in_one_line(
    cli: Any, db: psycopg.Connection, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    (before,) = db.execute("SELECT count(*) FROM data_export").fetchone()
    assert cli(["export", "request", "--requested-by", REQUESTER, *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err[:500]
    assert fragment in err and len(err) < 600 and "Traceback" not in err
    assert db.execute("SELECT count(*) FROM data_export").fetchone() == (before,)  # nothing filed


def test_cli_refuses_a_requester_that_is_not_a_uuid(cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["export", "request", "--requested-by", "not-a-uuid", "--kind", "audit_log"]) == 2
    err = capsys.readouterr().err
    assert err == "error: requested_by is not a UUID: 'not-a-uuid'\n"


def test_cli_run_of_a_bad_row_fails_it_in_one_line(
    cli: Any, db: psycopg.Connection, scratch_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for filters_json, fragment in (('{"end": "9999-12-31"}', "dates must be between"), (DEEP, "too deeply")):
        request_id = _raw_request(db, "audit_log", "csv.gz", filters_json)
        assert cli(["export", "run", str(request_id)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err[:500]
        req = ex.get_request(db, request_id)
        assert req is not None and req["status"] == "failed" and fragment in req["error"]
        assert cli(["export", "status", str(request_id)]) == 1  # prints the row, deep filters included
        assert f"id: {request_id}" in capsys.readouterr().out
    assert _visible(scratch_dir) == []


def test_cli_run_of_a_request_held_elsewhere_is_one_line(
    loaded: str, cli: Any, db: psycopg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    request_id = _request(db, "usage_log", "csv.gz", {})
    with psycopg.connect(loaded, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (Locks.EXPORT_CLASS, request_id))
        assert cli(["export", "run", str(request_id)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: export request {request_id} is being run by another process\n"


BIG_USER = "22222222-3333-4444-8555-666666666666"


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_a_row_larger_than_the_csv_block_size_exports(
    loaded: str, db: psycopg.Connection, scratch_dir: Path, fmt: str
) -> None:
    """audit_log.details can be several MiB: one ~3 MB record is longer than pyarrow's CSV block (1 MiB), which
    with newlines_in_values used to fail with "straddling object straddles two block boundaries"."""
    details = {"blob": 'x\n"y", ' * 400_000, "n": 1}  # ~3.2 MB of JSON, quotes and newlines doubled in CSV
    db.execute(
        "INSERT INTO audit_log (timestamp, user_id, event_type, operation, severity, details) "
        "VALUES ('2026-02-21 08:00+00', %s, 'big.row', 'update', 'low', %s)",
        (BIG_USER, Jsonb(details)),
    )
    db.execute(
        "INSERT INTO audit_log (timestamp, user_id, event_type, operation, severity, description) "
        "VALUES ('2026-02-21 09:00+00', %s, 'small.row', 'update', 'low', 'after the big one')",
        (BIG_USER,),
    )
    try:
        request_id = _request(
            db, "audit_log", fmt, {"user_id": BIG_USER, "start": "2026-02-21", "end": "2026-02-21"}
        )
        result = _run(loaded, request_id, scratch_dir)
        expected = _expected(db, "audit_log", "user_id = %(u)s", {"u": BIG_USER})
        assert result.rows == 2 and result.csv_bytes > 3_000_000
        assert _read_file(result.path, "audit_log")[1] == (
            _csv_blank(expected) if fmt == "csv.gz" else expected
        )
    finally:
        db.execute("DELETE FROM audit_log WHERE user_id = %s", (BIG_USER,))


@pytest.mark.parametrize("fmt", ["csv.gz", "parquet"])
def test_max_mb_per_s_paces_the_export(
    loaded: str, db: psycopg.Connection, scratch_dir: Path, fmt: str
) -> None:
    started = time.monotonic()
    fast = _run(loaded, _request(db, "audit_log", fmt, {}), scratch_dir)
    fast_s = time.monotonic() - started
    rate = fast.csv_bytes / 1e6 / 1.5  # a pace that must stretch the export to 1.5 s
    started = time.monotonic()
    paced = _run(loaded, _request(db, "audit_log", fmt, {}), scratch_dir, max_mb_per_s=rate)
    paced_s = time.monotonic() - started
    assert paced.rows == fast.rows and paced.csv_bytes == fast.csv_bytes and paced.sha256 == fast.sha256
    assert fast_s < 1.0 <= 1.45 <= paced_s  # the last report waits until bytes / rate seconds have passed


def test_an_unusable_export_location_fails_before_the_claim(
    loaded: str,
    db: psycopg.Connection,
    seaweedfs_server: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A missing bucket (or refused credentials) is one error naming PERF_PIPELINE_EXPORT_DIR, before the
    request is claimed: it stays pending, untouched, for a run once the location is fixed."""
    from perf_pipeline.cli import main
    from perf_pipeline.lib.storage import StorageError

    request_id = _request(db, "audit_log", "csv.gz", {"start": "2026-02-28"})
    with pytest.raises(StorageError, match=r"^PERF_PIPELINE_EXPORT_DIR .*bucket 'no-such-bucket-ppt' does"):
        _run(loaded, request_id, "s3://no-such-bucket-ppt/exports")
    req = ex.get_request(db, request_id)
    assert req is not None and (req["status"], req["attempts"], req["file_path"]) == ("pending", 0, None)

    monkeypatch.setenv("PERF_PIPELINE_DATABASE_URL", loaded)
    monkeypatch.setenv("PERF_PIPELINE_REDIS_URL", "redis://127.0.0.1:1/0")  # not used
    monkeypatch.setenv("PERF_PIPELINE_EXPORT_DIR", "s3://no-such-bucket-ppt/exports")
    monkeypatch.setenv(
        "PERF_PIPELINE_AUDIT_RETENTION_MONTHS", "600"
    )  # the CLI and the job use the real today
    assert main(["export", "run", str(request_id)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: PERF_PIPELINE_EXPORT_DIR") and err.count("\n") == 1, err
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in err

    run = _execute_job(request_id, loaded, dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not run.success
    failure = next(e for e in run.all_events if e.event_type_value == "STEP_FAILURE")
    assert "PERF_PIPELINE_EXPORT_DIR" in str(failure.event_specific_data)
    assert ex.get_request(db, request_id)["status"] == "pending"  # type: ignore[index]
