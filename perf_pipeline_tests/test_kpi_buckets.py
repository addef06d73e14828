"""KPI buckets (0080, perf_pipeline.lib.kpi_buckets): the KPIs stay usage_log's exact numbers at any
instant, with sealed, unsealed, late-marked and pruned buckets, and the sealing is safe to fail or re-run.

Every expected number is computed in Python from usage_log's rows, independently of the SQL.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import psycopg
import pytest

from perf_pipeline.defs.rollups.kpi_buckets import (
    CHECK_RECONCILED,
    CHECK_TRUSTED,
    usage_kpi_buckets,
)
from perf_pipeline.lib import db as db_lib
from perf_pipeline.lib import kpi_buckets as kb
from perf_pipeline.lib.dashboard import compute_kpis
from perf_pipeline.lib.db import Locks
from perf_pipeline.lib.partitioning import ensure_partitions
from perf_pipeline.testing import materialize

UTC = dt.UTC
HOUR = dt.timedelta(hours=1)
B = kb.BUCKET
NOW_GRACE = dt.timedelta(0)  # tests seal every closed bucket at once
ALL_TRUSTED = int(dt.timedelta(hours=48) / kb.BUCKET) - 1  # closed buckets readers trust


@dataclass(frozen=True)
class Usage:
    user_id: uuid.UUID
    created_at: dt.datetime
    minutes: Decimal
    cost: Decimal
    billable: bool


def _db_now(conn: psycopg.Connection) -> dt.datetime:
    return conn.execute("SELECT now()").fetchone()[0].astimezone(UTC)  # buckets are UTC-aligned


def _top(now: dt.datetime) -> dt.datetime:
    """The start of the bucket holding ``now``."""
    return now - (now - now.replace(minute=0, second=0, microsecond=0)) % B


def _insert(conn: psycopg.Connection, rows: list[Usage]) -> None:
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY usage_log (user_id, created_at, duration_minutes, cost_usd, is_billable, stt_provider) "
            "FROM STDIN"
        ) as copy,
    ):
        for r in rows:
            copy.write_row((r.user_id, r.created_at, r.minutes, r.cost, r.billable, "google"))


def _rows(conn: psycopg.Connection) -> list[Usage]:
    return [
        Usage(*r)
        for r in conn.execute(
            "SELECT user_id, created_at, duration_minutes, cost_usd, is_billable FROM usage_log"
        ).fetchall()
    ]


def _expected(rows: list[Usage], as_of: dt.datetime) -> dict[str, Any]:
    """The usage part of the KPIs at ``as_of``, straight from the rows."""
    window = [r for r in rows if as_of - dt.timedelta(hours=24) <= r.created_at < as_of]
    minutes = [r.minutes for r in window]
    avg = (sum(minutes, Decimal(0)) / len(minutes)) if minutes else Decimal(0)
    return {
        "transcriptions_last_hour": sum(1 for r in window if r.created_at >= as_of - HOUR),
        "active_users_24h": len({r.user_id for r in window}),
        "daily_revenue_usd": float(sum((r.cost for r in window if r.billable), Decimal(0))),
        "avg_duration_minutes": float(avg.quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)),
    }


def _kpis(conn: psycopg.Connection, as_of: dt.datetime) -> dict[str, Any]:
    got = compute_kpis(conn, as_of)["real_time"]
    return {
        k: got[k]
        for k in ("transcriptions_last_hour", "active_users_24h", "daily_revenue_usd", "avg_duration_minutes")
    }


def _instants(now: dt.datetime, rows: list[Usage]) -> list[dt.datetime]:
    """as_of values that hit every edge: bucket boundaries, a row's own instant (excluded) and the instant
    24 h after it (the row is the window's first), an hour back landing on and off a boundary, the
    horizon, the future."""
    top = _top(now)
    minutes = [
        0,
        1,
        7,
        59,
        60,
        61,
        90,
        150,
        23 * 60,
        24 * 60,
        24 * 60 + 1,
        25 * 60,
        30 * 60,
        47 * 60,
        70 * 60,
    ]
    out = [now - dt.timedelta(minutes=m) for m in minutes]
    out += [
        top,
        top - HOUR,
        top - 23 * HOUR,
        top - 24 * HOUR,
        top - 46 * HOUR,
        top - B,
        top + dt.timedelta(seconds=1),
        top - 7 * B + dt.timedelta(microseconds=1),
        now + dt.timedelta(minutes=30),
    ]
    sample = random.Random(7).sample(rows, 6)
    out += [r.created_at for r in sample] + [r.created_at + dt.timedelta(hours=24) for r in sample]
    return out


def _assert_exact(conn: psycopg.Connection, instants: list[dt.datetime] | None = None) -> None:
    rows = _rows(conn)
    for as_of in instants or _instants(_db_now(conn), rows):
        assert _kpis(conn, as_of) == _expected(rows, as_of), f"as_of {as_of.isoformat()}"


def _buckets(conn: psycopg.Connection) -> dict[dt.datetime, tuple]:
    return {
        r[0]: r[1:]
        for r in conn.execute(
            "SELECT bucket, transcriptions, billable_cost_usd, active_users, length(user_bits) "
            "FROM usage_kpi_buckets"
        ).fetchall()
    }


def _users_of_sealed_span(conn: psycopg.Connection) -> int:
    return conn.execute(
        "SELECT count(DISTINCT user_id) FROM usage_log WHERE created_at >= (SELECT min(bucket) FROM "
        "usage_kpi_buckets) AND created_at < (SELECT max(bucket) + interval '5 minutes' FROM usage_kpi_buckets)"
    ).fetchone()[0]


def _a_row_between(conn: psycopg.Connection, lo: dt.datetime, hi: dt.datetime) -> dt.datetime:
    row = conn.execute(
        "SELECT created_at FROM usage_log WHERE created_at >= %s AND created_at < %s ORDER BY created_at LIMIT 1",
        (lo, hi),
    ).fetchone()
    assert row is not None
    return row[0].astimezone(UTC)


@pytest.fixture(scope="module")
def loaded_url(db_url: str) -> str:
    """Usage rows over the last 50 hours (and the current bucket), 80 users of which 10 appear only in
    the current bucket, rows on whole hours and a microsecond before them."""
    rng = random.Random(2026)
    users = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(80)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        now = _db_now(conn)
        ensure_partitions(conn, "usage_log", [(now - dt.timedelta(days=4)).date(), now.date()])
        top = _top(now)
        rows = []
        for _ in range(3000):
            at = now - dt.timedelta(seconds=rng.uniform(1, 50 * 3600))
            rows.append(_usage(rng, rng.choice(users[:70]), at))
        whole_hour = now.replace(minute=0, second=0, microsecond=0)
        for k in range(1, 50):
            rows.append(_usage(rng, rng.choice(users[:70]), whole_hour - k * HOUR))
            rows.append(
                _usage(rng, rng.choice(users[:70]), whole_hour - k * HOUR - dt.timedelta(microseconds=1))
            )
        for u in users[70:]:  # users only in the current (open) bucket
            rows.append(_usage(rng, u, top + (now - top) / 2))
        with conn.transaction():
            _insert(conn, rows)
    return db_url


def _usage(rng: random.Random, user: uuid.UUID, at: dt.datetime) -> Usage:
    return Usage(
        user,
        at,
        Decimal(rng.randint(1, 9000)) / 100,
        Decimal(rng.randint(0, 99999)) / 10000,
        rng.random() < 0.8,
    )


@pytest.fixture
def conn(loaded_url: str) -> Iterator[psycopg.Connection]:
    """Autocommit, session time zone not UTC (and not a whole hour off): buckets must not depend on it."""
    with psycopg.connect(loaded_url, autocommit=True, options="-c TimeZone=Asia/Kathmandu") as c:
        yield c


def test_kpis_are_exact_before_and_after_sealing_and_read_the_buckets(conn: psycopg.Connection) -> None:
    conn.execute("DELETE FROM usage_kpi_buckets")
    _assert_exact(conn)  # no bucket: everything from usage_log
    result = kb.seal_buckets(conn, grace=NOW_GRACE)
    assert result.committed and result.reconciled and not result.skipped
    # every closed bucket readers trust, consecutive (read from the result: a boundary may pass meanwhile)
    assert set(_buckets(conn)) == set(result.buckets) and len(result.buckets) == ALL_TRUSTED
    assert all(b - a == B for a, b in zip(result.buckets, result.buckets[1:], strict=False))
    assert kb.untrusted_buckets(conn, NOW_GRACE) in ([], [_top(_db_now(conn)) - B])
    now = _db_now(conn)
    top = _top(now)
    _assert_exact(conn)
    # the read really uses the buckets: a row changed behind the sealing's back changes the KPIs
    bucket = top - 60 * B
    conn.execute(
        "UPDATE usage_kpi_buckets SET billable_cost_usd = billable_cost_usd + 1000 WHERE bucket = %s",
        (bucket,),
    )
    got, expected = _kpis(conn, now)["daily_revenue_usd"], _expected(_rows(conn), now)["daily_revenue_usd"]
    assert got == pytest.approx(expected + 1000)
    # ... and a late-data mark on that bucket makes the read ignore it again
    conn.execute("INSERT INTO usage_kpi_stale_buckets (bucket) VALUES (%s)", (bucket,))
    _assert_exact(conn, [now])
    again = kb.seal_buckets(conn, grace=NOW_GRACE)
    assert bucket in again.buckets and again.stale_buckets_cleared == [bucket] and again.committed
    _assert_exact(conn)


def test_rerun_seals_nothing_new_and_ordinals_have_no_gaps(conn: psycopg.Connection) -> None:
    kb.seal_buckets(conn, grace=NOW_GRACE)
    before = _buckets(conn)
    again = kb.seal_buckets(conn, grace=NOW_GRACE, buckets=[])
    assert again.buckets == [] and again.committed is False and again.new_users == 0
    assert _buckets(conn) == before
    n, top = conn.execute("SELECT count(*), max(ordinal) FROM usage_user_ordinals").fetchone()
    assert n == _users_of_sealed_span(conn) and top == n - 1  # dense: one per user, none burnt by re-runs


def test_bitmaps_of_different_widths_are_padded(conn: psycopg.Connection) -> None:
    """A user first seen in a later bucket widens the later bitmaps; the OR pads the older ones."""
    kb.seal_buckets(conn, grace=NOW_GRACE)
    top = _top(_db_now(conn))
    bucket = top - 24 * B
    newcomer = Usage(uuid.uuid4(), bucket + dt.timedelta(minutes=1), Decimal("1.00"), Decimal("0.5"), True)
    _insert(conn, [newcomer])  # a late row: marks its bucket
    assert kb.stale_buckets(conn) == [bucket]
    kb.seal_buckets(conn, grace=NOW_GRACE)
    widths = {b[3] for b in _buckets(conn).values()}
    assert len(widths) == 2  # the resealed bucket is one bit wider than the others
    _assert_exact(conn)


@pytest.mark.parametrize("change", ["insert", "update", "delete"])
def test_late_change_marks_its_bucket_and_kpis_stay_exact(conn: psycopg.Connection, change: str) -> None:
    kb.seal_buckets(conn, grace=NOW_GRACE)
    top = _top(_db_now(conn))
    rng = random.Random(change)
    if change == "insert":
        at = top - 36 * B + dt.timedelta(minutes=1)
        _insert(conn, [_usage(rng, uuid.uuid4(), at)])
        expected_marks = [top - 36 * B]
    else:
        at = _a_row_between(conn, top - 4 * HOUR, top - 3 * HOUR)
        if change == "update":  # moves a row from one sealed bucket to another: both marked
            conn.execute(
                "UPDATE usage_log SET created_at = created_at - interval '2 hours', cost_usd = cost_usd + 1 "
                "WHERE created_at = %s",
                (at,),
            )
            expected_marks = sorted({_top(at) - 2 * HOUR, _top(at)})
        else:
            conn.execute("DELETE FROM usage_log WHERE created_at = %s", (at,))
            expected_marks = [_top(at)]
    assert kb.stale_buckets(conn) == expected_marks
    _assert_exact(conn)  # marked buckets are read from usage_log
    result = kb.seal_buckets(conn, grace=NOW_GRACE)
    # (plus any bucket that closed meanwhile)
    assert set(expected_marks) <= set(result.buckets) and result.stale_buckets_cleared == expected_marks
    assert kb.stale_buckets(conn) == []
    _assert_exact(conn)


def test_rows_of_the_current_bucket_or_beyond_the_horizon_mark_nothing(conn: psycopg.Connection) -> None:
    kb.seal_buckets(conn, grace=NOW_GRACE)  # claims every mark
    assert kb.stale_buckets(conn) == []
    user = uuid.uuid4()
    # stamped inside the current bucket as the statement sees it, and 49 h back: no mark
    conn.execute(
        """INSERT INTO usage_log (user_id, created_at, duration_minutes, cost_usd, is_billable, stt_provider)
           SELECT %s, ts, 1, 0, false, 'google'
           FROM (SELECT usage_kpi_bucket_of(statement_timestamp()) AS top) t,
                LATERAL (VALUES (t.top + (statement_timestamp() - t.top) / 2),
                                (t.top - interval '49 hours')) AS v(ts)""",
        (user,),
    )
    assert kb.stale_buckets(conn) == []
    conn.execute("DELETE FROM usage_log WHERE user_id = %s", (user,))  # may mark, if a bucket closed since
    kb.seal_buckets(conn, grace=NOW_GRACE)
    _assert_exact(conn)


def test_sealing_waits_for_writers_in_flight(loaded_url: str, conn: psycopg.Connection) -> None:
    """A transaction that has written when the sealing looks may hold rows of a bucket without a mark
    (its statement began before the bucket ended): the sealing waits for it, or gives up and seals
    nothing; the bucket it claimed stays due."""
    kb.seal_buckets(conn, grace=NOW_GRACE)
    now = _db_now(conn)
    bucket = _top(now) - 48 * B
    conn.execute("INSERT INTO usage_kpi_stale_buckets (bucket) VALUES (%s)", (bucket,))
    with psycopg.connect(loaded_url) as writer:
        writer.execute("SELECT pg_current_xact_id()")  # has an xid, not committed
        gave_up = kb.seal_buckets(conn, grace=NOW_GRACE, wait_s=0.3)
        assert gave_up.skipped and not gave_up.committed and gave_up.waited_s >= 0.3
        # the claim took the mark and the row it no longer vouched for: the bucket is due, read raw
        assert kb.stale_buckets(conn) == [] and bucket not in _buckets(conn)
        assert kb.buckets_due(conn, NOW_GRACE)[0] == bucket
        _assert_exact(conn, [now])

        box: dict[str, kb.SealResult] = {}
        thread = threading.Thread(
            target=lambda: box.setdefault("r", _seal_in_new_connection(loaded_url, wait_s=30))
        )
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # waiting for the writer
        writer.commit()
        thread.join(30)
    assert box["r"].committed and bucket in box["r"].buckets and box["r"].waited_s > 0.2
    assert kb.stale_buckets(conn) == []
    _assert_exact(conn)


def _seal_in_new_connection(url: str, **kwargs: Any) -> kb.SealResult:
    with psycopg.connect(url, autocommit=True) as c:
        return kb.seal_buckets(c, grace=NOW_GRACE, **kwargs)


def test_bad_buckets_are_rolled_back_and_fail_the_blocking_check(
    loaded_url: str, conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injected in the sealing statement (one transcription too many): the reconciliation catches
    it on the same snapshot, nothing is written, the check fails; the bucket stays due."""
    kb.seal_buckets(conn, grace=NOW_GRACE)
    before = _buckets(conn)
    bucket = min(before) + 100 * B
    conn.execute("INSERT INTO usage_kpi_stale_buckets (bucket) VALUES (%s)", (bucket,))
    real = db_lib.load_query

    def corrupt(name: str) -> str:
        text = real(name)
        return text.replace("count(*)   ", "count(*) + 1") if name == "kpi_buckets_seal" else text

    monkeypatch.setattr(kb, "load_query", corrupt)
    run = materialize([usage_kpi_buckets], loaded_url, raise_on_error=False)
    check = next(e for e in run.get_asset_check_evaluations() if e.check_name == CHECK_RECONCILED)
    assert not check.passed and check.blocking
    assert check.metadata["mismatching_buckets"].value >= 1
    listed = check.metadata["mismatches"].records
    assert all(r.data["transcriptions (bucket)"] != r.data["transcriptions (usage_log)"] for r in listed)
    assert _buckets(conn) == {b: v for b, v in before.items() if b != bucket}
    assert bucket in kb.buckets_due(conn, NOW_GRACE)
    _assert_exact(conn)
    monkeypatch.undo()
    repaired = kb.seal_buckets(conn, grace=NOW_GRACE)
    assert repaired.committed and bucket in repaired.buckets
    _assert_exact(conn)


def test_a_sealing_killed_mid_way_leaves_no_stale_bucket_and_reruns(
    conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server kills the sealing's session after its upsert, before the commit: the late row's bucket
    has lost its mark (claimed) but also its old row, so the KPIs stay exact; a re-run seals it."""
    kb.seal_buckets(conn, grace=NOW_GRACE)
    bucket = _top(_db_now(conn)) - 72 * B
    _insert(conn, [_usage(random.Random(6), uuid.uuid4(), bucket + dt.timedelta(minutes=1))])  # late row
    assert kb.stale_buckets(conn) == [bucket]
    real = db_lib.load_query
    monkeypatch.setattr(
        kb,
        "load_query",
        lambda name: (
            "SELECT pg_terminate_backend(pg_backend_pid())" if name == "kpi_buckets_reconcile" else real(name)
        ),
    )
    with psycopg.connect(conn.info.dsn, autocommit=True) as victim, pytest.raises(psycopg.OperationalError):
        kb.seal_buckets(victim, grace=NOW_GRACE)
    monkeypatch.undo()
    assert kb.stale_buckets(conn) == [] and bucket not in _buckets(conn)
    _assert_exact(conn)
    # the advisory lock died with the session: a re-run seals the bucket
    result = kb.seal_buckets(conn, grace=NOW_GRACE)
    assert result.committed and bucket in result.buckets
    _assert_exact(conn)


def test_sparse_bitmaps_are_renumbered_and_resealed(conn: psycopg.Connection) -> None:
    """Users who left keep their ordinals: after much churn the sealing renumbers the users densely and
    reseals every bucket in the same run; the KPIs stay exact throughout."""
    kb.seal_buckets(conn, grace=NOW_GRACE)
    users = conn.execute("SELECT count(*) FROM usage_user_ordinals").fetchone()[0]
    assert kb.seal_buckets(conn, grace=NOW_GRACE).compacted_from_bits == 0  # dense: nothing to do
    # 10,000 numbers burnt by users no longer active: the next sealing numbers newcomers after them
    conn.execute(
        "SELECT setval(pg_get_serial_sequence('usage_user_ordinals', 'ordinal'), 10000 + %s)", (users,)
    )
    top = _top(_db_now(conn))
    _insert(conn, [_usage(random.Random(9), uuid.uuid4(), top - 30 * B + dt.timedelta(minutes=1))])
    widened = kb.seal_buckets(conn, grace=NOW_GRACE)
    assert widened.compacted_from_bits == 0 and widened.committed  # not yet: one wide bucket
    assert max(b[3] for b in _buckets(conn).values()) > 10000
    _assert_exact(conn)
    result = kb.seal_buckets(conn, grace=NOW_GRACE)
    assert result.compacted_from_bits > 10000 and result.committed
    assert len(result.buckets) == ALL_TRUSTED  # every bucket resealed by the same run
    n, top_ordinal = conn.execute("SELECT count(*), max(ordinal) FROM usage_user_ordinals").fetchone()
    assert n == _users_of_sealed_span(conn) and top_ordinal == n - 1  # dense again
    assert max(b[3] for b in _buckets(conn).values()) == n
    _assert_exact(conn)


def test_a_late_row_far_back_is_sealed_in_its_own_run() -> None:
    t0 = dt.datetime(2026, 1, 1, tzinfo=UTC)
    buckets = [t0, t0 + B, t0 + 2 * B, t0 + 40 * B, t0 + 41 * B, t0 + 90 * B]
    assert kb.contiguous_runs(buckets) == [buckets[:3], buckets[3:5], buckets[5:]]
    assert kb.contiguous_runs([]) == []


def test_a_late_writer_holding_its_mark_makes_the_sealing_give_up_not_wait(
    loaded_url: str, conn: psycopg.Connection
) -> None:
    """A late writer that has locked an existing mark (FOR KEY SHARE) and does not commit: the claim
    gives up after its lock_timeout, the run says so, nothing is left half-done; the check reports the
    untrusted bucket; once the writer commits, the next run seals it with the row."""
    kb.seal_buckets(conn, grace=NOW_GRACE)
    bucket = _top(_db_now(conn)) - 12 * B
    conn.execute("INSERT INTO usage_kpi_stale_buckets (bucket) VALUES (%s)", (bucket,))
    with psycopg.connect(loaded_url) as writer:
        _insert(writer, [_usage(random.Random(12), uuid.uuid4(), bucket + dt.timedelta(minutes=2))])
        started = time.monotonic()
        result = kb.seal_buckets(conn, grace=NOW_GRACE)
        assert time.monotonic() - started < 30
        assert "held a late-data mark" in result.skipped and not result.committed
        assert kb.stale_buckets(conn) == [bucket] and bucket in kb.untrusted_buckets(conn, NOW_GRACE)
        _assert_exact(conn, [_db_now(conn)])
        writer.commit()
    result = kb.seal_buckets(conn, grace=NOW_GRACE)
    assert result.committed and bucket in result.buckets and kb.stale_buckets(conn) == []
    _assert_exact(conn)


def test_a_second_sealing_returns_at_once(loaded_url: str, conn: psycopg.Connection) -> None:
    with psycopg.connect(loaded_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (Locks.KPI_SEALING.number,))
        result = kb.seal_buckets(conn, grace=NOW_GRACE)
        assert result.skipped == "another sealing is running" and not result.committed
        other.execute("SELECT pg_advisory_unlock(%s)", (Locks.KPI_SEALING.number,))


def test_prune_drops_buckets_beyond_the_horizon(conn: psycopg.Connection) -> None:
    kb.seal_buckets(conn, grace=NOW_GRACE)
    old = _top(_db_now(conn)) - 60 * HOUR
    conn.execute(
        "INSERT INTO usage_kpi_buckets (bucket, transcriptions, billable_cost_usd, duration_minutes_sum, "
        "duration_minutes_count, user_bits, active_users) VALUES (%s, 1, 0, 0, 0, B'1', 1)",
        (old,),
    )
    conn.execute("INSERT INTO usage_kpi_stale_buckets (bucket) VALUES (%s)", (old,))
    result = kb.seal_buckets(conn, grace=NOW_GRACE)
    assert result.pruned_buckets == 1 and result.pruned_marks == 1
    assert kb.stale_buckets(conn) == []
    assert old not in _buckets(conn)


def test_bad_input_is_refused(conn: psycopg.Connection, loaded_url: str) -> None:
    top = _top(_db_now(conn))
    with pytest.raises(kb.KpiBucketError, match="naive"):
        kb.seal_buckets(conn, buckets=[dt.datetime(2026, 1, 1, 10)])
    with pytest.raises(kb.KpiBucketError, match="not a whole"):
        kb.seal_buckets(conn, buckets=[top - B + dt.timedelta(minutes=1)], grace=NOW_GRACE)
    with pytest.raises(kb.KpiBucketError, match="not a whole"):
        kb.seal_buckets(conn, buckets=[top], grace=NOW_GRACE)  # the current bucket is not closed
    with pytest.raises(kb.KpiBucketError, match="not a whole"):
        kb.seal_buckets(conn, buckets=[top - 49 * HOUR], grace=NOW_GRACE)  # beyond the horizon
    with pytest.raises(kb.KpiBucketError, match="grace"):
        kb.seal_buckets(conn, grace=dt.timedelta(minutes=-1))
    with psycopg.connect(loaded_url) as tx, pytest.raises(kb.KpiBucketError, match="autocommit"):
        kb.seal_buckets(tx)
    assert conn.execute("SELECT pg_try_advisory_lock(%s)", (Locks.KPI_SEALING.number,)).fetchone()[0]
    conn.execute("SELECT pg_advisory_unlock(%s)", (Locks.KPI_SEALING.number,))


def test_asset_seals_with_its_check(loaded_url: str, conn: psycopg.Connection) -> None:
    conn.execute("DELETE FROM usage_kpi_buckets")
    run = materialize([usage_kpi_buckets], loaded_url)
    assert run.success
    meta = run.asset_materializations_for_node("usage_kpi_buckets")[0].metadata
    assert meta["committed"].value is True and meta["buckets_sealed"].value >= ALL_TRUSTED - 2
    checks = {e.check_name: e for e in run.get_asset_check_evaluations()}
    assert checks[CHECK_RECONCILED].passed
    assert checks[CHECK_TRUSTED].passed or checks[CHECK_TRUSTED].metadata["untrusted_buckets"].value <= 1
    _assert_exact(conn)
