-- rollup_day_totals_disagree: the closed days of [%(start_day)s, %(end_day)s) whose usage_daily_metrics
-- row disagrees with usage_log on sessions, minutes or billable revenue (exactly, numeric), among the
-- days that should agree: rolled up, no late-data mark or claim pending (those are about to be
-- recomputed), and in a month whose rows are all in usage_log (not archived: see
-- lib.rollups.late_rows_in_archived_months). The safety net behind the late-data marks: a day found here
-- lost its mark somewhere (a bug, a write the triggers did not see, a restored backup).
-- Run in one REPEATABLE READ transaction, so the rollup, the marks and usage_log are one snapshot.
-- Cost: one scan of the window's usage_log rows (BRIN/partition-pruned), counts and sums only: no
-- distinct users, no per-provider grouping (the daily rollup's own reconciliation does those).
WITH truth AS (
    SELECT (created_at AT TIME ZONE 'UTC')::date                     AS day,
           count(*)                                                  AS sessions,
           sum(duration_minutes)                                     AS minutes,
           coalesce(sum(cost_usd) FILTER (WHERE is_billable), 0)     AS revenue
    FROM usage_log
    WHERE created_at >= %(start_ts)s AND created_at < %(end_ts)s
    GROUP BY 1
)
SELECT m.day,
       coalesce(t.sessions, 0) AS expected_sessions, m.sessions      AS rolled_sessions,
       coalesce(t.minutes, 0)  AS expected_minutes,  m.total_minutes AS rolled_minutes,
       coalesce(t.revenue, 0)  AS expected_revenue,  m.revenue       AS rolled_revenue
FROM usage_daily_metrics m
LEFT JOIN truth t USING (day)
WHERE m.day >= %(start_day)s AND m.day < %(end_day)s
  AND (coalesce(t.sessions, 0) <> m.sessions
       OR coalesce(t.minutes, 0) <> m.total_minutes
       OR coalesce(t.revenue, 0) <> m.revenue)
  AND NOT EXISTS (SELECT 1 FROM usage_rollup_stale_days s WHERE s.day = m.day)
  AND NOT EXISTS (SELECT 1 FROM usage_rollup_claims c WHERE c.day = m.day)
  AND NOT EXISTS (SELECT 1 FROM archive_manifest a
                  WHERE a.table_name = 'usage_log' AND a.state <> 'restored'
                    AND a.month = date_trunc('month', m.day)::date)
ORDER BY m.day
