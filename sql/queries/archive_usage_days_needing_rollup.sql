-- archive_usage_days_needing_rollup: days of one usage_log month partition ({partition}) that the
-- rollups may still recompute, so usage retention must not drop the month yet: days with usage rows
-- but no usage_daily_metrics row, or whose rollup was computed before the day's latest usage row.
-- Cost: one pass over the partition grouped by UTC day (run once a month, on an old month).
SELECT u.day
FROM (
    SELECT (created_at AT TIME ZONE 'UTC')::date AS day, max(created_at) AS latest
    FROM {partition}
    GROUP BY 1
) u
LEFT JOIN usage_daily_metrics m ON m.day = u.day
WHERE m.day IS NULL OR m.computed_at < u.latest
ORDER BY u.day
