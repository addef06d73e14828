"""The exports API (GET /api/v1/exports/{id} and …/file) on real PostgreSQL, with files on local disk and on
S3 (the session's private SeaweedFS): who may see what, every answer for every state, the bytes downloaded
equal to the file, HEAD without reading the file, bounded chunks, and never a 500."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest
from fastapi.testclient import TestClient
from psycopg.types.json import Jsonb

from perf_pipeline.api import app as app_module
from perf_pipeline.api.app import DOWNLOAD_BLOCK_BYTES, create_app
from perf_pipeline.lib import exports as ex
from perf_pipeline.lib.cache import DashboardCache, serving_client
from perf_pipeline.lib.workload import WorkloadSpec, load_workload
from perf_pipeline.settings import Settings
from perf_pipeline.testing import asgi_request, free_port
from perf_pipeline_tests.conftest import Location

ADMIN = "admin-token-0123456789abcdef"
OWNER = "00000000-0000-4000-8000-0000000000a1"
OTHER = "00000000-0000-4000-8000-0000000000b2"
OWNER_TOKEN = "owner-token-0123456789abcdef"
OTHER_TOKEN = "other-token-0123456789abcdef"
BARE = "bare-user-token-0123456789"
SETTINGS = Settings(
    admin_tokens=(ADMIN,),
    user_tokens=(f"{OWNER}:{OWNER_TOKEN}", f"{OTHER}:{OTHER_TOKEN}", BARE),  # type: ignore[arg-type]
)
END = dt.datetime(2026, 3, 1, 6, tzinfo=dt.UTC)
TODAY = dt.date(2026, 3, 2)


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.fixture(scope="module")
def loaded(db_url: str) -> str:
    load_workload(db_url, WorkloadSpec(days=3, usage_per_day=200, audit_per_day=2000, end=END))
    return db_url


@pytest.fixture(scope="module")
def pool(loaded: str) -> Iterator[psycopg_pool.ConnectionPool]:
    with psycopg_pool.ConnectionPool(loaded, min_size=1, max_size=4, kwargs={"autocommit": True}) as p:
        yield p


@pytest.fixture
def client(redis_url: str, pool: psycopg_pool.ConnectionPool) -> TestClient:
    cache = DashboardCache(serving_client(redis_url, 200), pool.connection)
    return TestClient(create_app(SETTINGS, cache))


def _file(conn: psycopg.Connection, requested_by: str, fmt: str = "csv.gz") -> int:
    return ex.file_request(conn, requested_by, "audit_log", fmt, {"start": "2026-02-27"})


def _export(loaded: str, where: Path | str, requested_by: str, fmt: str = "csv.gz") -> dict[str, Any]:
    """A finished export of ``requested_by``, written to ``where`` (a folder or an s3:// URL)."""
    with psycopg.connect(loaded, autocommit=True) as conn:
        request_id = _file(conn, requested_by, fmt)
        ex.run_export(
            loaded,
            request_id,
            where,
            statement_timeout_s=60,
            retention_months={"audit_log": 12, "usage_log": 24},
            today=TODAY,
        )
        req = ex.get_request(conn, request_id)
    assert req is not None and req["status"] == "succeeded"
    return req


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_the_owner_and_admins_download_the_file_others_get_404(
    loaded: str, location: Location, client: TestClient, fmt: str
) -> None:
    req = _export(loaded, location.value, OWNER, fmt)
    request_id = req["id"]
    data = location.store.read_bytes(req["file_path"].rsplit("/", 1)[-1])
    for token in (OWNER_TOKEN, ADMIN):
        status = client.get(f"/api/v1/exports/{request_id}", headers=_auth(token))
        assert status.status_code == 200, status.text
        body = status.json()
        assert body["status"] == "succeeded" and body["requested_by"] == OWNER
        assert (body["rows"], body["bytes"], body["sha256"]) == (req["rows"], len(data), req["sha256"])
        assert body["file_url"] == f"/api/v1/exports/{request_id}/file" and "file_path" not in body
        got = client.get(body["file_url"], headers=_auth(token))
        assert got.status_code == 200 and got.content == data
        assert hashlib.sha256(got.content).hexdigest() == req["sha256"]
        assert got.headers["content-length"] == str(len(data))
        assert got.headers["etag"] == f'"{req["sha256"]}"'
        assert got.headers["content-type"] == app_module.MEDIA_TYPES[fmt]
        assert (
            got.headers["content-disposition"]
            == f'attachment; filename="export-{request_id}-audit_log.{fmt}"'
        )
    # another user's request and an unknown id are the same 404: existence is not revealed
    for suffix in ("", "/file"):
        path = f"/api/v1/exports/{request_id}{suffix}"
        other = client.get(path, headers=_auth(OTHER_TOKEN))
        unknown = client.get(f"/api/v1/exports/987654321{suffix}", headers=_auth(OWNER_TOKEN))
        assert other.status_code == unknown.status_code == 404
        assert other.json() == unknown.json() == {"detail": "no such export request"}
        assert client.get(path, headers=_auth(BARE)).status_code == 403  # not linked to a user
        missing = client.get(path)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert client.get(path, headers=_auth("not-a-known-token-at-all")).status_code == 401


def test_unfinished_and_failed_exports_are_409_with_their_status_readable(
    loaded: str, client: TestClient
) -> None:
    with psycopg.connect(loaded, autocommit=True) as conn:
        pending = _file(conn, OWNER)
        running = _file(conn, OWNER)
        failed = _file(conn, OWNER)
        conn.execute("UPDATE data_export SET status = 'running', attempts = 1 WHERE id = %s", (running,))
        ex.mark_failed(conn, failed, "statement timeout")
    for request_id, state in ((pending, "pending"), (running, "running"), (failed, "failed")):
        status = client.get(f"/api/v1/exports/{request_id}", headers=_auth(OWNER_TOKEN))
        assert status.status_code == 200 and status.json()["status"] == state
        assert status.json()["file_url"] is None
        got = client.get(f"/api/v1/exports/{request_id}/file", headers=_auth(OWNER_TOKEN))
        assert got.status_code == 409, got.text
        if state == "failed":
            assert "failed" in got.json()["detail"] and status.json()["error"] == "statement timeout"
        else:
            assert got.headers["retry-after"] == "15" and "not finished" in got.json()["detail"]


@pytest.mark.parametrize("damage", ["deleted", "replaced", "same size, other bytes"])
def test_a_finished_export_whose_file_is_gone_or_changed_is_410(
    loaded: str, location: Location, client: TestClient, damage: str
) -> None:
    req = _export(loaded, location.value, OWNER)
    name = req["file_path"].rsplit("/", 1)[-1]
    data = location.store.read_bytes(name)
    if damage == "deleted":
        location.store.delete(name)
    elif damage == "replaced":
        location.store.write_bytes(name, b"something else")
    else:
        location.store.write_bytes(name, bytes(reversed(data)))
    got = client.get(f"/api/v1/exports/{req['id']}/file", headers=_auth(OWNER_TOKEN))
    assert got.status_code == 410 and "no longer available" in got.json()["detail"]
    assert client.head(f"/api/v1/exports/{req['id']}/file", headers=_auth(ADMIN)).status_code == 410
    assert client.get(f"/api/v1/exports/{req['id']}", headers=_auth(OWNER_TOKEN)).status_code == 200


def _asgi_body_messages(
    app: Any, method: str, path: str, token: str
) -> tuple[int, dict[str, str], list[bytes]]:
    """One request straight through the ASGI app: status, headers and each body message as sent (the client
    stays connected: a streamed answer waits for a disconnect that never comes)."""
    return asgi_request(app, method, path, token=token, stay_connected=True)


def test_a_large_file_streams_in_bounded_chunks_and_head_does_not_read_it(
    loaded: str,
    location: Location,
    redis_url: str,
    pool: psycopg_pool.ConnectionPool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = os.urandom(9 << 20)
    info = location.store.write_bytes("export-big-audit_log.parquet", data)
    with psycopg.connect(loaded, autocommit=True) as conn:
        request_id = _file(conn, OWNER, "parquet")
        conn.execute(
            "UPDATE data_export SET status = 'succeeded', finished_at = now(), file_path = %s, rows = 1, "
            "bytes = %s, sha256 = %s, etag = %s WHERE id = %s",
            (info.uri, len(data), hashlib.sha256(data).hexdigest(), info.etag, request_id),
        )
    app = create_app(SETTINGS, DashboardCache(serving_client(redis_url, 200), pool.connection))
    path = f"/api/v1/exports/{request_id}/file"
    status, headers, bodies = _asgi_body_messages(app, "GET", path, OWNER_TOKEN)
    assert status == 200 and b"".join(bodies) == data and headers["content-length"] == str(len(data))
    chunks = [b for b in bodies if b]
    assert len(chunks) >= 4 and max(map(len, chunks)) <= DOWNLOAD_BLOCK_BYTES  # memory: one block

    def no_read(*args: object) -> None:
        raise AssertionError("a HEAD must not read the file")

    monkeypatch.setattr(app_module, "_stream_object", no_read)
    head_status, head_headers, head_bodies = _asgi_body_messages(app, "HEAD", path, ADMIN)
    assert head_status == 200 and b"".join(head_bodies) == b""
    assert {k: head_headers[k] for k in ("content-length", "etag", "content-type")} == {
        k: headers[k] for k in ("content-length", "etag", "content-type")
    }


def test_storage_down_is_503_not_500(
    loaded: str, client: TestClient, seaweedfs_server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = seaweedfs_server.create_bucket()  # type: ignore[attr-defined]
    try:
        req = _export(loaded, f"s3://{bucket}/x", OWNER)
        closed = free_port()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")  # the store is unreachable
        got = client.get(f"/api/v1/exports/{req['id']}/file", headers=_auth(OWNER_TOKEN))
        assert got.status_code == 503 and got.json() == {"detail": "the file storage is unavailable"}
        assert bucket not in got.text and "127.0.0.1" not in got.text
    finally:
        monkeypatch.undo()
        seaweedfs_server.delete_bucket(bucket)  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", ["0", "-1", "abc", "9223372036854775808", "1.5", "%00"])
def test_a_malformed_id_is_422(client: TestClient, bad: str) -> None:
    for suffix in ("", "/file"):
        got = client.get(f"/api/v1/exports/{bad}{suffix}", headers=_auth(ADMIN))
        assert got.status_code == 422, (bad, suffix, got.text)


def test_filters_of_any_json_shape_are_shown_as_stored(loaded: str, client: TestClient) -> None:
    with psycopg.connect(loaded, autocommit=True) as conn:
        (request_id,) = conn.execute(
            "INSERT INTO data_export (requested_by, kind, format, filters) VALUES (%s, 'x', 'y', %s) RETURNING id",
            (OWNER, Jsonb(["not", {"an": "object"}])),
        ).fetchone()
    got = client.get(f"/api/v1/exports/{request_id}", headers=_auth(OWNER_TOKEN))
    assert got.status_code == 200 and got.json()["filters"] == ["not", {"an": "object"}]
    assert client.get(f"/api/v1/exports/{request_id}/file", headers=_auth(OWNER_TOKEN)).status_code == 409
