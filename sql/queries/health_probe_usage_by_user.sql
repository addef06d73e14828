-- health_probe_usage_by_user: one user's usage per day over the last 30 days (admin "usage by user").
--
-- Budget: PERF_PIPELINE_ANALYTICS_BUDGET_MS. Needs idx_usage_log_user_created (user_id, created_at DESC).
SELECT date_trunc('day', created_at AT TIME ZONE 'UTC') AS day,
       count(*)                                          AS sessions,
       sum(duration_minutes)                             AS minutes,
       sum(cost_usd) FILTER (WHERE is_billable)          AS revenue
FROM usage_log
WHERE user_id = %(user_id)s
  AND created_at >= now() - interval '30 days'
GROUP BY 1
ORDER BY 1 DESC;
