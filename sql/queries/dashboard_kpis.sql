-- dashboard_kpis: the dashboard's real-time KPIs at one instant (the as_of parameter, a timestamptz; NULL = now()).
--
-- Definitions are the dashboard's original ones (get_realtime_kpis_optimized), with their defects fixed:
--  * active_transcriptions counts every session in status 'processing'; the original only looked at
--    sessions created in the last 24 h, so a long transcription vanished from the gauge.
--  * failed_last_hour counts sessions that failed (updated_at) in the hour before as_of, whenever
--    they were created (the original also required created_at in the last 24 h).
--  * error_rate_percent = failed_last_hour / transcriptions_last_hour × 100 as originally, but the
--    denominator is at least failed_last_hour, so the rate stays within 0–100 percent (the original reported
--    0 percent when every recent session failed and nothing new was logged, and could exceed 100 percent).
--  * every window is bounded above by as_of (rows stamped in the future are not "last hour"), so the
--    same as_of always gives the same numbers: the asset check recomputes a cached snapshot exactly.
--  * the instant comes from the database clock (now()), not the application's naive utcnow().
--
-- Cost (0080): the 24-hour aggregates read the window's sealed 5-minute buckets from usage_kpi_buckets
-- (288 rows a day; distinct users as the OR of one bitmap per bucket) and only the rest from usage_log:
-- the partial buckets at both ends of the window, the bucket the last hour starts in (so that the last
-- hour's count is whole buckets plus raw rows), and any bucket without a trusted row (the newest, not
-- sealed yet, or one a late row marked; see 0080). So a miss reads minutes of usage_log rows, whatever
-- the rows per day; without buckets (a fresh database, an as_of older than the horizon) it reads the
-- 24 hours, and gives the same numbers. usage_log is read through idx_usage_log_created_brin and
-- partition pruning, one range scan per range; session through two tiny partial indexes
-- (idx_session_processing, idx_session_failed_updated). No locks beyond ACCESS SHARE.
WITH t AS (
    SELECT coalesce(%(as_of)s::timestamptz, now()) AS as_of
),
w AS (
    SELECT t.as_of,
           t.as_of - interval '24 hours' AS lo,
           t.as_of - interval '1 hour'   AS hour_ago,
           -- sealed buckets are trusted from the first bucket wholly inside the window, and not before
           -- the horizon (less one bucket of margin, see 0080), counted from this statement's start
           -- (which follows every write this snapshot sees; now() may be older in a long transaction) ...
           greatest(usage_kpi_bucket_of(t.as_of - interval '24 hours' - interval '1 microsecond')
                        + usage_kpi_bucket_width(),
                    usage_kpi_bucket_of(statement_timestamp()) - usage_kpi_bucket_horizon() + usage_kpi_bucket_width())
                                         AS first_bucket,
           -- ... to the last one ending by as_of ...
           usage_kpi_bucket_of(t.as_of)  AS end_bucket,
           -- ... except the one the last hour starts inside (NULL when it starts on a boundary)
           nullif(usage_kpi_bucket_of(t.as_of - interval '1 hour'), t.as_of - interval '1 hour')
                                         AS straddle_bucket
    FROM t
),
sealed AS MATERIALIZED (
    SELECT k.bucket, k.transcriptions, k.billable_cost_usd, k.duration_minutes_sum, k.duration_minutes_count,
           k.user_bits, k.bucket >= w.hour_ago AS in_last_hour
    FROM w
    JOIN usage_kpi_buckets k ON k.bucket >= w.first_bucket AND k.bucket < w.end_bucket
    WHERE k.bucket IS DISTINCT FROM w.straddle_bucket
      AND NOT EXISTS (SELECT 1 FROM usage_kpi_stale_buckets s WHERE s.bucket = k.bucket)
),
raw_ranges AS (
    -- [lo, as_of) minus the sealed buckets
    SELECT r.range_lo AS lo, r.range_hi AS hi
    FROM w,
         usage_kpi_raw_ranges(w.lo, w.as_of,
                              (SELECT range_agg(tstzrange(s.bucket, s.bucket + usage_kpi_bucket_width()))
                               FROM sealed s)) AS r
),
raw AS MATERIALIZED (
    SELECT u.user_id, u.cost_usd, u.is_billable, u.duration_minutes, u.created_at >= w.hour_ago AS in_last_hour
    FROM w, raw_ranges r
    JOIN LATERAL (
        SELECT l.user_id, l.cost_usd, l.is_billable, l.duration_minutes, l.created_at
        FROM usage_log l
        WHERE l.created_at >= r.lo
          AND l.created_at < r.hi
        OFFSET 0  -- not flattened: one range scan per range, whatever the table's size
    ) AS u ON true
),
bits AS (
    -- the OR of the sealed buckets' bitmaps, shorter ones padded with zeros (0080)
    SELECT coalesce(bit_or(b.user_bits || repeat('0', b.width - length(b.user_bits))::varbit), ''::varbit)
               AS user_bits
    FROM (SELECT s.user_bits, max(length(s.user_bits)) OVER () AS width FROM sealed s) AS b
),
sealed_totals AS (
    SELECT coalesce(sum(s.transcriptions) FILTER (WHERE s.in_last_hour), 0) AS last_hour,
           coalesce(sum(s.billable_cost_usd), 0)                          AS revenue,
           coalesce(sum(s.duration_minutes_sum), 0)                       AS minutes,
           coalesce(sum(s.duration_minutes_count), 0)                     AS minutes_n
    FROM sealed s
),
raw_totals AS (
    SELECT count(*) FILTER (WHERE r.in_last_hour)                         AS last_hour,
           coalesce(sum(r.cost_usd) FILTER (WHERE r.is_billable), 0)      AS revenue,
           coalesce(sum(r.duration_minutes), 0)                           AS minutes,
           count(r.duration_minutes)                                      AS minutes_n
    FROM raw r
),
usage_24h AS MATERIALIZED (
    SELECT
        st.last_hour + rt.last_hour                                              AS transcriptions_last_hour,
        bit_count(bits.user_bits)
          + (SELECT count(*)
               FROM (SELECT DISTINCT r.user_id FROM raw r) AS ru
               LEFT JOIN usage_user_ordinals o ON o.user_id = ru.user_id
              WHERE o.ordinal IS NULL
                 OR o.ordinal >= length(bits.user_bits)
                 OR get_bit(bits.user_bits, o.ordinal) = 0)                      AS active_users_24h,
        st.revenue + rt.revenue                                                  AS daily_revenue_usd,
        coalesce((st.minutes + rt.minutes) / nullif(st.minutes_n + rt.minutes_n, 0), 0)
                                                                                 AS avg_duration_minutes
    FROM bits, sealed_totals st, raw_totals rt
),
sessions AS MATERIALIZED (
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
