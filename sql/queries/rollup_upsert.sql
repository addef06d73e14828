-- rollup_upsert: recompute the daily usage rollup for every UTC day in [%(start_day)s, %(end_day)s)
-- in ONE set-based statement, whatever the number of days (today's refresh, a late day, a 90-day
-- backfill: same statement).
--
-- Reads usage_log once, over [%(start_ts)s, %(end_ts)s) (the same window as UTC timestamps: partition
-- pruning plus the BRIN index on created_at), hash-aggregated to one row per (day, user, provider)
-- (a few hundred thousand rows for 90 days of 1M rows; the caller raises work_mem so the hash stays in
-- memory where a sort of every row would spill), from which distinct users, per-provider and per-day
-- totals derive. Money and minutes are summed as numeric: exact. Writes:
--   usage_daily_metrics           one row per day of the window (zeros for a day without usage), upserted;
--   usage_daily_provider_metrics  one row per (day, provider) present; providers gone from a day deleted;
--   usage_daily_user_sets         one sorted uuid[] of distinct users per day, rewritten only if changed
--                                 (the rewritten days are returned: rollup_period_user_sets reads them).
-- Inserted/updated and deleted row sets are disjoint: the data-modifying CTEs never touch a row twice.
-- Locks: ROW EXCLUSIVE on the three rollup tables (row locks on the rows it rewrites); usage_log is
-- only read.
WITH src AS MATERIALIZED (
    SELECT (u.created_at AT TIME ZONE 'UTC')::date                   AS day,
           u.user_id,
           u.stt_provider,
           count(*)                                                  AS n,
           sum(u.duration_minutes)                                   AS minutes,
           coalesce(sum(u.cost_usd) FILTER (WHERE u.is_billable), 0) AS revenue
    FROM usage_log u
    WHERE u.created_at >= %(start_ts)s AND u.created_at < %(end_ts)s
    GROUP BY 1, 2, 3
),
days AS (
    SELECT %(start_day)s::date + i AS day
    FROM generate_series(0, %(end_day)s::date - %(start_day)s::date - 1) AS i
),
providers AS (
    SELECT day, stt_provider, sum(n) AS sessions, sum(minutes) AS minutes, sum(revenue) AS revenue
    FROM src GROUP BY day, stt_provider
),
per_day AS (
    SELECT day, sum(sessions) AS sessions, sum(minutes) AS minutes, sum(revenue) AS revenue
    FROM providers GROUP BY day
),
user_sets AS (
    SELECT day, array_agg(DISTINCT user_id ORDER BY user_id) AS user_ids FROM src GROUP BY day
),
upsert_days AS (
    INSERT INTO usage_daily_metrics AS t
        (day, sessions, total_minutes, revenue, active_users, avg_duration, rows_scanned, computed_at)
    SELECT d.day,
           coalesce(p.sessions, 0),
           coalesce(p.minutes, 0),
           coalesce(p.revenue, 0),
           coalesce(cardinality(us.user_ids), 0),
           p.minutes / p.sessions,             -- numeric / bigint: the same value as avg(duration_minutes)
           coalesce(p.sessions, 0),            -- every usage_log row of the day is read once
           clock_timestamp()
    FROM days d
    LEFT JOIN per_day p USING (day)
    LEFT JOIN user_sets us USING (day)
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
upsert_user_sets AS (
    INSERT INTO usage_daily_user_sets AS t (day, user_ids)
    SELECT d.day, coalesce(us.user_ids, '{}') FROM days d LEFT JOIN user_sets us USING (day)
    ON CONFLICT (day) DO UPDATE SET user_ids = EXCLUDED.user_ids
    WHERE t.user_ids IS DISTINCT FROM EXCLUDED.user_ids
    RETURNING t.day
)
SELECT (SELECT count(*) FROM upsert_days)                      AS days,
       (SELECT coalesce(sum(rows_scanned), 0)::bigint FROM upsert_days) AS rows_scanned,
       (SELECT coalesce(sum(sessions), 0)::bigint FROM upsert_days) AS sessions,
       (SELECT coalesce(sum(revenue), 0) FROM upsert_days)      AS revenue,
       (SELECT count(*) FROM upsert_providers)                  AS provider_rows_written,
       (SELECT count(*) FROM drop_providers)                    AS provider_rows_deleted,
       (SELECT count(*) FROM upsert_user_sets)                  AS user_sets_written,
       (SELECT coalesce(array_agg(day), '{}') FROM upsert_user_sets) AS changed_days;
