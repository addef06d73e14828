-- rollup_trends: usage totals per period (day / ISO week starting Monday / month) over the days
-- [%(start)s, %(end)s], read from the rollup tables only, never usage_log. Every period overlapping the
-- range has a row, zeros where nothing was rolled up. %(unit)s is 'day', 'week' or 'month' (date_trunc's
-- units; weeks start on Monday, as ISO).
--
-- Cost: one index range scan of usage_daily_metrics (one row per day). Weekly/monthly active users are
-- exact distinct counts, not sums: a period whose first day is in the range reads its row of
-- usage_period_user_sets (0070: the users of its closed days, counted in advance) plus the day sets
-- of its days after that row's last_day (today, and yesterday before its closing rollup); a period
-- cut by the range's start, or one whose row reaches past the range's end, unions its days' sets of
-- usage_daily_user_sets (one array element per user and day). So a range aligned on period starts
-- costs one row per closed period plus at most a couple of day sets, whatever its length.
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
-- active users are not additive: each period's days within the range, as a stored period set (when
-- it starts inside the range and ends by the range's end) plus the day sets not in it
bounds AS (
    SELECT period,
           greatest(period, %(start)s::date)                                         AS first_day,
           least((period + ('1 ' || %(unit)s)::interval)::date - 1, %(end)s::date)   AS last_day
    FROM periods
    WHERE %(unit)s <> 'day'
),
parts AS (
    SELECT b.period, b.last_day, s.active_users AS stored_users, s.user_ids AS stored_ids,
           coalesce(s.last_day + 1, b.first_day) AS days_from
    FROM bounds b
    LEFT JOIN usage_period_user_sets s
           ON s.unit = %(unit)s AND s.period = b.period AND b.first_day = b.period AND s.last_day <= b.last_day
),
users AS (
    SELECT p.period,
           CASE WHEN p.days_from > p.last_day THEN p.stored_users  -- nothing to add: no array is read
                ELSE (SELECT count(DISTINCT x.user_id)
                      FROM (SELECT unnest(p.stored_ids)
                            UNION ALL
                            SELECT unnest(d.user_ids) FROM usage_daily_user_sets d
                            WHERE d.day BETWEEN p.days_from AND p.last_day) AS x(user_id))
           END AS active_users
    FROM parts p
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
