-- 0090_usage_rollup_claims: a late-data mark survives any crash until the rollup that consumed it commits.
--
-- Before: the rollup deleted the marks of its window (usage_rollup_stale_days, 0021) in a transaction of
-- its own, committed, then computed; a rollup killed between the two (SIGKILL, OOM, pg_terminate_backend)
-- took the marks with it, so the day stayed wrong with nothing left to re-run it.
--
-- Now the claim *moves* the marks into usage_rollup_claims in that same short transaction (the protocol
-- of 0021 is unchanged: the DELETE still waits for late writers holding a mark, and the rollup's snapshot
-- is still taken after it commits), and the rollup deletes its claims in the transaction that writes the
-- new numbers. Rollups are serialized by a session advisory lock, so a claim that exists while nobody
-- holds that lock belongs to a rollup that died: the next rollup, or the late-data sensor (which takes
-- the lock with pg_try_advisory_lock), turns it back into a mark with a new marked_at, and the sensor
-- re-runs the day. Writers never touch this table.
CREATE TABLE usage_rollup_claims (
    day        date        PRIMARY KEY,
    marked_at  timestamptz NOT NULL,                            -- the mark's time when it was claimed
    claimed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE usage_rollup_claims IS
    'Late-data marks claimed by the usage_daily_metrics rollup running now (or by one that died: re-armed).';
