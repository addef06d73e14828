-- rollup_trends: usage totals per period (day / ISO week starting Monday / month) over the days
-- [%(start)s, %(end)s], read from the rollup tables only (cost: one index range scan of
-- usage_daily_metrics, and of usage_daily_user_sets for the exact distinct users of weeks and months;
-- never usage_log). Every period overlapping the range has a row, zeros where nothing was rolled up.
-- %(unit)s is 'day', 'week' or 'month' (date_trunc's units; weeks start on Monday, as ISO).
WITH periods AS (
    SELECT DISTINCT date_trunc(%(unit)s, d)::date AS period
    FROM generate_series(%(start)s::date::timestamp, %(end)s::date::timestamp, interval '1 day') AS d
),
totals AS (
    SELECT date_trunc(%(unit)s, day::timestamp)::date AS period,
           sum(sessions)      AS sessions,
           sum(total_minutes) AS minutes,
           sum(revenue)       AS revenue,
           max(active_users)  AS daily_users  -- only read when the period is one day
    FROM usage_daily_metrics
    WHERE day BETWEEN %(start)s AND %(end)s
    GROUP BY 1
),
-- active users are not additive: distinct (period, user) pairs, counted (a hash aggregate)
users AS (
    SELECT period, count(*) AS active_users
    FROM (SELECT DISTINCT date_trunc(%(unit)s, s.day::timestamp)::date AS period, u.user_id
          FROM usage_daily_user_sets s, unnest(s.user_ids) AS u(user_id)
          WHERE s.day BETWEEN %(start)s AND %(end)s AND %(unit)s <> 'day') AS pairs
    GROUP BY period
)
SELECT p.period,
       coalesce(t.sessions, 0)                                            AS session_count,
       coalesce(t.minutes, 0)                                             AS total_minutes,
       coalesce(t.revenue, 0)                                             AS total_cost,
       CASE WHEN %(unit)s = 'day' THEN coalesce(t.daily_users, 0)
            ELSE coalesce(u.active_users, 0) END                          AS active_users,
       coalesce(t.minutes / nullif(t.sessions, 0), 0)                     AS avg_duration
FROM periods p
LEFT JOIN totals t USING (period)
LEFT JOIN users u USING (period)
ORDER BY p.period;
