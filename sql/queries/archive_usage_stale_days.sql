-- archive_usage_stale_days: days of one month that the rollups' late-data triggers (migration 0021) marked
-- as changed after they were rolled up, or that a rollup has claimed and not committed yet (0090): the
-- rollup will recompute them, so usage retention must not drop their month yet. Cost: primary-key range
-- reads of two tiny tables.
SELECT day FROM usage_rollup_stale_days WHERE day >= %(start)s AND day < %(end)s
UNION
SELECT day FROM usage_rollup_claims WHERE day >= %(start)s AND day < %(end)s
ORDER BY day
