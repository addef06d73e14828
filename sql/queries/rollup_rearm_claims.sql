-- rollup_rearm_claims: turn every claim in usage_rollup_claims back into a late-data mark (with a new
-- marked_at, so the late-data sensor requests the day again). Run only while holding the rollup advisory
-- lock, when no live rollup can own a claim: by a rollup before it claims (left by a rollup that died),
-- by a rollup that did not commit (its own), and by the late-data sensor after pg_try_advisory_lock.
-- Returns the re-armed days. Cost: two tiny tables.
WITH released AS (
    DELETE FROM usage_rollup_claims RETURNING day
), rearmed AS (
    INSERT INTO usage_rollup_stale_days (day)
    SELECT day FROM released
    ON CONFLICT (day) DO NOTHING
)
SELECT day FROM released ORDER BY day
