-- dashboard_kpis: the dashboard's real-time KPIs at one instant (the as_of parameter, a timestamptz; NULL = now()).
--
-- Definitions are the user story's (get_realtime_kpis_optimized), with its defects fixed:
--  * active_transcriptions counts every session in status 'processing'; the seed only looked at
--    sessions created in the last 24 h, so a long transcription vanished from the gauge.
--  * failed_last_hour counts sessions that failed (updated_at) in the hour before as_of, whenever
--    they were created (the seed also required created_at in the last 24 h).
--  * error_rate_percent = failed_last_hour / transcriptions_last_hour × 100 as in the seed, but the
--    denominator is at least failed_last_hour, so the rate stays within 0–100 percent (the seed reported
--    0 percent when every recent session failed and nothing new was logged, and could exceed 100 percent).
--  * every window is bounded above by as_of (rows stamped in the future are not "last hour"), so the
--    same as_of always gives the same numbers: the asset check recomputes a cached snapshot exactly.
--  * the instant comes from the database clock (now()), not the application's naive utcnow().
--
-- Cost: one range scan of the last 24 h of usage_log (idx_usage_log_created_brin / partition
-- pruning) plus two scans of tiny partial indexes on session (idx_session_processing,
-- idx_session_failed_updated). No locks beyond ACCESS SHARE.
WITH t AS (
    SELECT coalesce(%(as_of)s::timestamptz, now()) AS as_of
),
usage_24h AS (
    SELECT
        count(*) FILTER (WHERE u.created_at >= t.as_of - interval '1 hour')   AS transcriptions_last_hour,
        count(DISTINCT u.user_id)                                             AS active_users_24h,
        coalesce(sum(u.cost_usd) FILTER (WHERE u.is_billable), 0)            AS daily_revenue_usd,
        coalesce(avg(u.duration_minutes), 0)                                  AS avg_duration_minutes
    FROM usage_log u, t
    WHERE u.created_at >= t.as_of - interval '24 hours'
      AND u.created_at < t.as_of
),
sessions AS (
    SELECT
        (SELECT count(*) FROM session s WHERE s.status = 'processing')        AS active_transcriptions,
        (SELECT count(*) FROM session s, t
          WHERE s.status = 'failed'
            AND s.updated_at >= t.as_of - interval '1 hour'
            AND s.updated_at < t.as_of)                                       AS failed_last_hour
)
SELECT
    t.as_of,
    s.active_transcriptions,
    u.transcriptions_last_hour,
    u.active_users_24h,
    s.failed_last_hour,
    CASE WHEN greatest(u.transcriptions_last_hour, s.failed_last_hour) > 0
         THEN s.failed_last_hour::float8 * 100 / greatest(u.transcriptions_last_hour, s.failed_last_hour)
         ELSE 0 END                                                           AS error_rate_percent,
    u.daily_revenue_usd::float8                                               AS daily_revenue_usd,
    round(u.avg_duration_minutes, 4)::float8                                  AS avg_duration_minutes
FROM t, usage_24h u, sessions s;
