""":func:`archive_partition`: detach → export → verify → drop one month, resuming from its manifest state."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from perf_pipeline.lib.archive.files import (
    BATCH_BYTES,
    SETTING,
    ArchiveLocation,
    export_file,
    verify_file,
)
from perf_pipeline.lib.archive.manifest import (
    UNFINISHED,
    ArchiveError,
    Attachment,
    ManifestRow,
    State,
    attach_state,
    db_now,
    has_default,
    manifest_row,
    set_state,
)
from perf_pipeline.lib.db import (
    advisory_unlock,
    lock_timeout,
    retry,
    run_with_lock_retry,
    try_advisory_lock,
)
from perf_pipeline.lib.partitioning import MonthPartition
from perf_pipeline.lib.storage import open_store

log = logging.getLogger(__name__)

STEPS = ("detach", "export", "verify", "drop")
#: called after each completed step with its name; tests raise from it to simulate a crash
StepHook = Callable[[str], None]
DROP_LOCK_TIMEOUT_MS = 5000
DETACH_LOCK_TIMEOUT_MS = 100
#: exports per archive call whose verification may fail before it gives up (the month stays detached)
VERIFY_ATTEMPTS = 3


@dataclass
class ArchiveResult:
    table: str
    month: dt.date
    state: str  # final state: dropped, or absent (no such partition, nothing to do)
    rows: int = 0
    bytes: int = 0
    sha256: str | None = None
    file_path: str | None = None
    etag: str | None = None
    steps_run: list[str] = field(default_factory=list)
    step_ms: dict[str, float] = field(default_factory=dict)
    detach_mode: str | None = None  # plain / concurrently / finalize / none (found already detached)

    @property
    def duration_ms(self) -> float:
        return sum(self.step_ms.values())


def detach(conn: psycopg.Connection, part: MonthPartition, lock_timeout_ms: int) -> str:
    """Detach (or finish detaching) a month and record it ``detached``; returns how: ``plain``,
    ``concurrently``, ``finalize`` or ``none`` (found already detached). Locks: ACCESS EXCLUSIVE on the
    parent (plain, finalize) or SHARE UPDATE EXCLUSIVE (concurrently), bounded by ``lock_timeout_ms`` and
    retried."""
    table, name = part.table, part.name
    state = attach_state(conn, table, name)
    parent, child = sql.Identifier(table), sql.Identifier(name)
    mode = "none"
    if state == Attachment.DETACH_PENDING:
        mode = "finalize"
        run_with_lock_retry(
            conn,
            lambda c: c.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(parent, child)),
            lock_timeout_ms=lock_timeout_ms,
            attempts=100,
            what=f"finalize detach {name}",
        )
    elif state == Attachment.ATTACHED and not has_default(conn, part):
        mode = "concurrently"
        # CONCURRENTLY runs two transactions itself, so it cannot share one with the manifest update;
        # the re-run sees the catalog state (standalone / detach_pending) and finishes.
        with lock_timeout(conn, lock_timeout_ms):
            retry(
                lambda: conn.execute(
                    sql.SQL("ALTER TABLE {} DETACH PARTITION {} CONCURRENTLY").format(parent, child)
                ),
                attempts=100,
                what=f"detach {name} concurrently",
            )
    elif state == Attachment.ATTACHED:

        def work(c: psycopg.Connection) -> None:
            c.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(parent, child))
            set_state(c, part, State.DETACHED)

        run_with_lock_retry(conn, work, lock_timeout_ms=lock_timeout_ms, attempts=200, what=f"detach {name}")
        return "plain"
    with conn.transaction():
        set_state(conn, part, State.DETACHED)
    return mode


def _require_standalone(conn: psycopg.Connection, part: MonthPartition, state: str) -> None:
    """Refuse to go on with a month whose detached table was attached to its parent again (by hand or by an
    older ``move_default_rows``): rows written since then are in it and not in the file."""
    if attach_state(conn, part.table, part.name) == Attachment.ATTACHED:
        raise ArchiveError(
            f"{part.name} is attached to {part.table} again although its archive stopped at {state}: not "
            f"exporting or dropping it (rows written since are not in the file). It is live data again: run "
            f"perf-pipeline archive restore {part.month:%Y-%m} --table {part.table} (marks it restored), then "
            f"archive it again"
        )


def _drop(conn: psycopg.Connection, part: MonthPartition, m: ManifestRow, lock_timeout_ms: int) -> None:
    """Drop the verified, detached table and mark the month dropped, in one transaction.

    Locks the table ACCESS EXCLUSIVE first (bounded by ``lock_timeout_ms``, retried): ATTACH also needs that
    lock, so after it nobody can attach the table or write into it; then it must still be standalone and
    hold exactly the manifest's row count, else :class:`ArchiveError` and nothing is dropped. No lock on
    the parent. Cost: one count(*) of the table.
    """
    table, month, name = part.table, part.month, part.name
    ident = sql.Identifier(name)

    def work(c: psycopg.Connection) -> None:
        state = attach_state(c, table, name)
        if state != Attachment.ABSENT:
            c.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(ident))
            state = attach_state(c, table, name)
            if state != Attachment.STANDALONE:
                raise ArchiveError(
                    f"{name} is {state.replace('_', ' ')} to {table} although its archive was verified: not "
                    f"dropping it; run perf-pipeline archive restore {month:%Y-%m} --table {table}, then archive "
                    f"it again"
                )
            rows = c.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()[0]
            if rows != m.rows:
                raise ArchiveError(
                    f"{name} has {rows} rows, the manifest says {m.rows}: rows were written into the detached "
                    f"table after the export; not dropping it. Run perf-pipeline archive restore {month:%Y-%m} "
                    f"--table {table}, then archive it again"
                )
            c.execute(sql.SQL("DROP TABLE {}").format(ident))
        # absent: the table is already gone (nothing to drop); the verified file is the month
        c.execute(
            "UPDATE archive_manifest SET state = %s, dropped_at = now(), "
            "updated_at = now(), archive_count = archive_count + 1 "
            "WHERE table_name = %s AND month = %s",
            (State.DROPPED.value, table, month),
        )

    # Only the detached table is locked, so no platform statement queues behind this wait. The wait must
    # outlast deadlock_timeout (1 s by default): that is when PostgreSQL cancels an autovacuum blocking a
    # lock request. With the detach's 100 ms timeout, a freshly loaded month being auto-vacuumed kept the
    # drop retrying for 60 s at 10M rows (measured); with 5 s it waits ~1 s.
    run_with_lock_retry(
        conn,
        work,
        lock_timeout_ms=max(lock_timeout_ms, DROP_LOCK_TIMEOUT_MS),
        attempts=100,
        what=f"drop {name}",
    )


def archive_partition(
    conn: psycopg.Connection,
    table: str,
    month: dt.date,
    archive_dir: ArchiveLocation,
    *,
    hook: StepHook | None = None,
    lock_timeout_ms: int = DETACH_LOCK_TIMEOUT_MS,
    batch_bytes: int = BATCH_BYTES,
) -> ArchiveResult:
    """Detach → export → verify → drop ``table``'s partition of ``month``, resuming from the manifest.

    ``archive_dir``: a local folder, an ``s3://bucket/prefix`` URL or a :class:`Store`; it is checked
    (:meth:`Store.check`: bucket there, a probe object written and deleted) before anything else, so a bad
    location fails with :class:`StorageError` naming PERF_PIPELINE_ARCHIVE_DIR before any table is touched.
    A month already exported is verified and read where the manifest says it is.

    ``conn`` must be in autocommit mode. Idempotent: an already archived month returns at once
    (state ``dropped``, nothing re-exported); a month with no partition and no manifest row returns
    ``absent``. Locks: the month's advisory lock (waited for), ACCESS EXCLUSIVE on the parent for the
    detach only (bounded by ``lock_timeout_ms``, retried), then only the detached table. Cost: one
    sequential read of the partition for the export, two of the object and one count of the table for the
    verification; memory ~3 × ``batch_bytes``.
    """
    part = MonthPartition(table, month)
    month, name = part.month, part.name
    store = open_store(archive_dir, SETTING)
    store.check()
    result = ArchiveResult(table, month, "absent")
    verify_failures = 0
    # the drop relies on the file only if this very run read it back and matched it against the manifest
    # and the table: a run resuming at `verified` (after a crash, on another host, with the folder not
    # mounted or the file damaged since) proves it again first, and exports again if it does not hold
    proven_in_this_run = False
    try_advisory_lock(conn, part.lock, wait_s=None)
    try:
        while True:
            m = manifest_row(conn, table, month)
            state = m.state if m else None
            if state == State.DROPPED:
                assert m is not None
                result.state, result.rows, result.bytes = State.DROPPED.value, m.rows or 0, m.bytes or 0
                result.sha256, result.file_path, result.etag = m.sha256, m.file_path, m.etag
                return result
            started = time.perf_counter()
            if state in UNFINISHED:
                _require_standalone(conn, part, state)
            if state in (None, State.RESTORED):
                if attach_state(conn, table, name) == Attachment.ABSENT:
                    return result
                step = "detach"
                result.detach_mode = detach(conn, part, lock_timeout_ms)
            elif state == State.DETACHED:
                step = "export"
                facts, info = export_file(conn, part, store, batch_bytes)
                with conn.transaction():
                    set_state(
                        conn,
                        part,
                        State.EXPORTED,
                        file_path=info.uri,
                        rows=facts.rows,
                        bytes=facts.bytes,
                        sha256=facts.sha256,
                        min_ts=facts.min_ts,
                        max_ts=facts.max_ts,
                        etag=facts.etag,
                        version_id=facts.version_id,
                        verified_at=None,
                    )
            elif state == State.EXPORTED or (state == State.VERIFIED and not proven_in_this_run):
                step = "verify"
                assert m is not None
                try:
                    facts = verify_file(conn, part, m)
                except ArchiveError as exc:
                    # the table is still there: export again rather than trust a damaged or missing file,
                    # but not forever (a disk that keeps damaging files, data pyarrow cannot round-trip)
                    verify_failures += 1
                    with conn.transaction():
                        set_state(conn, part, State.DETACHED)
                    if verify_failures >= VERIFY_ATTEMPTS:
                        raise ArchiveError(
                            f"{name}: verification failed {verify_failures} times, giving up (last: {exc}). The "
                            f"month stays detached (invisible to queries, recorded as detached in archive_manifest, "
                            f"flagged by the archive files check): fix the cause and run the archive again, or "
                            f"perf-pipeline archive restore {month:%Y-%m} --table {table}"
                        ) from exc
                    log.warning(
                        "%s; exporting again (attempt %d/%d)", exc, verify_failures + 1, VERIFY_ATTEMPTS
                    )
                    continue
                proven_in_this_run = True
                with conn.transaction():
                    # what was read back: the ETag/version the files check compares later, and when
                    set_state(
                        conn,
                        part,
                        State.VERIFIED,
                        etag=facts.etag,
                        version_id=facts.version_id,
                        verified_at=db_now(conn),
                    )
                if state == State.VERIFIED:
                    log.info("%s: resumed at verified; the file was read back and still matches", name)
            elif state == State.VERIFIED:
                step = "drop"
                assert m is not None
                _drop(conn, part, m, lock_timeout_ms)
            else:
                raise ArchiveError(f"{name}: unexpected manifest state {state!r}")
            result.steps_run.append(step)
            result.step_ms[step] = result.step_ms.get(step, 0.0) + (time.perf_counter() - started) * 1000
            log.info("%s: %s done in %.0f ms", name, step, result.step_ms[step])
            if hook is not None:
                hook(step)
    finally:
        advisory_unlock(conn, part.lock)
