-- rollup_reconcile: days of [%(start_day)s, %(end_day)s) whose rollup differs from usage_log, computed
-- independently of rollup_upsert (plain aggregates straight over usage_log, no pre-aggregation):
-- sessions, minutes and billable revenue per day and per (day, provider) must be exactly equal
-- (numeric, no tolerance). Run in the rollup's own REPEATABLE READ transaction it checks exactly the
-- snapshot the rollup computed from, so rows arriving meanwhile cannot make it fail spuriously.
-- Cost: one more scan of the window's usage_log rows. Returns one row per mismatching (day, provider);
-- provider '*' is the day total.
WITH truth AS (
    SELECT (created_at AT TIME ZONE 'UTC')::date AS day,
           CASE WHEN grouping(stt_provider) = 1 THEN '*' ELSE stt_provider END AS provider,
           count(*)                             AS sessions,
           sum(duration_minutes)                AS minutes,
           sum(CASE WHEN is_billable THEN cost_usd ELSE 0 END) AS revenue
    FROM usage_log
    WHERE created_at >= %(start_ts)s AND created_at < %(end_ts)s
    GROUP BY GROUPING SETS (((created_at AT TIME ZONE 'UTC')::date),
                            ((created_at AT TIME ZONE 'UTC')::date, stt_provider))
),
rolled AS (
    SELECT day, '*' AS provider, sessions, total_minutes AS minutes, revenue
    FROM usage_daily_metrics
    WHERE day >= %(start_day)s AND day < %(end_day)s AND sessions > 0
    UNION ALL
    SELECT day, stt_provider, sessions, minutes, revenue
    FROM usage_daily_provider_metrics
    WHERE day >= %(start_day)s AND day < %(end_day)s
)
SELECT coalesce(t.day, r.day)           AS day,
       coalesce(t.provider, r.provider) AS provider,
       t.sessions AS expected_sessions, r.sessions AS rolled_sessions,
       t.minutes  AS expected_minutes,  r.minutes  AS rolled_minutes,
       t.revenue  AS expected_revenue,  r.revenue  AS rolled_revenue
FROM truth t
FULL JOIN rolled r ON r.day = t.day AND r.provider = t.provider
WHERE t.day IS NULL OR r.day IS NULL
   OR t.sessions <> r.sessions OR t.minutes <> r.minutes OR t.revenue <> r.revenue
ORDER BY 1, 2;
