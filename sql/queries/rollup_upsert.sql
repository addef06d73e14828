-- rollup_upsert: recompute the daily usage rollup for every UTC day in [%(start_day)s, %(end_day)s)
-- in ONE set-based statement, whatever the number of days (today's refresh, a late day, a 90-day
-- backfill: same statement).
--
-- Reads usage_log once, over [%(start_ts)s, %(end_ts)s) (the same window as UTC timestamps: partition
-- pruning plus the BRIN index on created_at), pre-aggregated to one row per (day, user, provider), from
-- which the per-day totals, per-provider totals and distinct users are derived. Writes:
--   usage_daily_metrics           one row per day of the window (zeros for a day without usage), upserted;
--   usage_daily_provider_metrics  one row per (day, provider) present; providers gone from a day deleted;
--   usage_daily_users             one row per (day, user); users gone from a day deleted.
-- Inserted and deleted row sets are disjoint, so the data-modifying CTEs never touch a row twice.
-- Money and minutes stay numeric end to end: sums are exact. Locks: ROW EXCLUSIVE on the three rollup
-- tables (row locks on the rows it rewrites); usage_log is only read.
WITH src AS MATERIALIZED (
    SELECT (u.created_at AT TIME ZONE 'UTC')::date                        AS day,
           u.user_id,
           u.stt_provider,
           count(*)                                                       AS n,
           sum(u.duration_minutes)                                        AS minutes,
           coalesce(sum(u.cost_usd) FILTER (WHERE u.is_billable), 0)      AS revenue
    FROM usage_log u
    WHERE u.created_at >= %(start_ts)s AND u.created_at < %(end_ts)s
    GROUP BY 1, 2, 3
),
days AS (
    SELECT %(start_day)s::date + i AS day
    FROM generate_series(0, %(end_day)s::date - %(start_day)s::date - 1) AS i
),
per_day AS (
    SELECT day, sum(n) AS sessions, sum(minutes) AS minutes, sum(revenue) AS revenue
    FROM src GROUP BY day
),
users AS (
    SELECT DISTINCT day, user_id FROM src
),
user_counts AS (
    SELECT day, count(*) AS active_users FROM users GROUP BY day
),
providers AS (
    SELECT day, stt_provider, sum(n) AS sessions, sum(minutes) AS minutes, sum(revenue) AS revenue
    FROM src GROUP BY day, stt_provider
),
upsert_days AS (
    INSERT INTO usage_daily_metrics AS t
        (day, sessions, total_minutes, revenue, active_users, avg_duration, rows_scanned, computed_at)
    SELECT d.day,
           coalesce(p.sessions, 0),
           coalesce(p.minutes, 0),
           coalesce(p.revenue, 0),
           coalesce(uc.active_users, 0),
           p.minutes / p.sessions,             -- numeric / bigint: the same value as avg(duration_minutes)
           coalesce(p.sessions, 0),            -- every usage_log row of the day is read once
           clock_timestamp()
    FROM days d
    LEFT JOIN per_day p USING (day)
    LEFT JOIN user_counts uc USING (day)
    ON CONFLICT (day) DO UPDATE SET
        sessions      = EXCLUDED.sessions,
        total_minutes = EXCLUDED.total_minutes,
        revenue       = EXCLUDED.revenue,
        active_users  = EXCLUDED.active_users,
        avg_duration  = EXCLUDED.avg_duration,
        rows_scanned  = EXCLUDED.rows_scanned,
        computed_at   = EXCLUDED.computed_at
    RETURNING t.day, t.sessions, t.revenue, t.rows_scanned
),
upsert_providers AS (
    INSERT INTO usage_daily_provider_metrics AS t (day, stt_provider, sessions, minutes, revenue)
    SELECT day, stt_provider, sessions, minutes, revenue FROM providers
    ON CONFLICT (day, stt_provider) DO UPDATE SET
        sessions = EXCLUDED.sessions, minutes = EXCLUDED.minutes, revenue = EXCLUDED.revenue
    WHERE (t.sessions, t.minutes, t.revenue) IS DISTINCT FROM (EXCLUDED.sessions, EXCLUDED.minutes, EXCLUDED.revenue)
    RETURNING 1
),
drop_providers AS (
    DELETE FROM usage_daily_provider_metrics t
    WHERE t.day >= %(start_day)s AND t.day < %(end_day)s
      AND NOT EXISTS (SELECT 1 FROM providers p WHERE p.day = t.day AND p.stt_provider = t.stt_provider)
    RETURNING 1
),
add_users AS (
    INSERT INTO usage_daily_users (day, user_id)
    SELECT day, user_id FROM users
    ON CONFLICT (day, user_id) DO NOTHING
    RETURNING 1
),
drop_users AS (
    DELETE FROM usage_daily_users t
    WHERE t.day >= %(start_day)s AND t.day < %(end_day)s
      AND NOT EXISTS (SELECT 1 FROM users u WHERE u.day = t.day AND u.user_id = t.user_id)
    RETURNING 1
)
SELECT (SELECT count(*) FROM upsert_days)                      AS days,
       (SELECT coalesce(sum(rows_scanned), 0)::bigint FROM upsert_days) AS rows_scanned,
       (SELECT coalesce(sum(sessions), 0)::bigint FROM upsert_days) AS sessions,
       (SELECT coalesce(sum(revenue), 0) FROM upsert_days)      AS revenue,
       (SELECT count(*) FROM upsert_providers)                  AS provider_rows_written,
       (SELECT count(*) FROM drop_providers)                    AS provider_rows_deleted,
       (SELECT count(*) FROM add_users)                         AS user_rows_added,
       (SELECT count(*) FROM drop_users)                        AS user_rows_deleted;
