-- archive_usage_stale_days: days of one month that the rollups' late-data triggers (migration 0021)
-- marked as changed after they were rolled up and that the late-data sensor will recompute, so usage
-- retention must not drop their month yet. Cost: a primary-key range read of a tiny table.
SELECT day
FROM usage_rollup_stale_days
WHERE day >= %(start)s AND day < %(end)s
ORDER BY day
