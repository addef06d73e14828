-- health_probe_trends: the dashboard's daily usage trend over the last 90 days, read from the rollup.
--
-- Budget: PERF_PIPELINE_ANALYTICS_BUDGET_MS. Reads usage_daily_metrics (migration 0020, issue 4) by
-- its primary key (at most 91 rows); the probe is skipped when that table does not exist.
SELECT day, sessions, total_minutes, revenue, active_users
FROM usage_daily_metrics
WHERE day >= (now() AT TIME ZONE 'UTC')::date - 90
ORDER BY day DESC;
