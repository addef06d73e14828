-- health_probe_kpis: the dashboard's real-time KPIs, as the user story computes them (its defects fixed:
-- active transcriptions are every 'processing' session, failures are counted by updated_at).
--
-- Budget: PERF_PIPELINE_ANALYTICS_BUDGET_MS. Reads the last 24 h of usage_log (partition pruning, BRIN
-- or billing index) and two tiny partial indexes of session.
WITH usage_24h AS (
    SELECT count(*) FILTER (WHERE created_at >= now() - interval '1 hour') AS transcriptions_last_hour,
           count(DISTINCT user_id)                                          AS active_users_24h,
           coalesce(sum(cost_usd) FILTER (WHERE is_billable), 0)            AS daily_revenue_usd,
           coalesce(avg(duration_minutes), 0)                               AS avg_duration_minutes
    FROM usage_log
    WHERE created_at >= now() - interval '24 hours'
)
SELECT u.*,
       (SELECT count(*) FROM session WHERE status = 'processing')           AS active_transcriptions,
       (SELECT count(*) FROM session
         WHERE status = 'failed' AND updated_at >= now() - interval '1 hour') AS failed_last_hour
FROM usage_24h u;
