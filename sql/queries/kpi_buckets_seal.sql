-- kpi_buckets_seal: (re)compute the given closed KPI buckets (usage_kpi_buckets, 0080) from usage_log,
-- upserted; a bucket without rows gets zeros (it is sealed all the same). Run after
-- kpi_buckets_ordinals.sql in the same REPEATABLE READ transaction. Returns buckets written, rows read.
--
-- user_bits: one character per ordinal ('1' = the user has a row in the bucket), cast to varbit; the
-- width is one more than the largest ordinal now, so older buckets may be shorter (readers pad them).
-- Cost: one range scan of [lo, hi) (the span of the buckets, known at plan time), plus per bucket one
-- pass over the ordinals (a few thousand) hash-joined with the bucket's users.
WITH buckets AS (
    SELECT DISTINCT unnest(%(buckets)s::timestamptz[]) AS bucket
),
width AS (
    SELECT coalesce(max(ordinal) + 1, 0) AS n FROM usage_user_ordinals
),
rows_ AS MATERIALIZED (
    SELECT usage_kpi_bucket_of(l.created_at) AS bucket,
           l.user_id, l.cost_usd, l.is_billable, l.duration_minutes
    FROM usage_log l
    WHERE l.created_at >= %(lo)s
      AND l.created_at < %(hi)s
      AND usage_kpi_bucket_of(l.created_at) = ANY(%(buckets)s::timestamptz[])
),
agg AS (
    SELECT bucket,
           count(*)                                              AS transcriptions,
           coalesce(sum(cost_usd) FILTER (WHERE is_billable), 0) AS billable_cost_usd,
           coalesce(sum(duration_minutes), 0)                    AS duration_minutes_sum,
           count(duration_minutes)                               AS duration_minutes_count
    FROM rows_
    GROUP BY bucket
),
users AS (
    SELECT r.bucket, array_agg(DISTINCT o.ordinal) AS ordinals
    FROM rows_ r
    JOIN usage_user_ordinals o ON o.user_id = r.user_id
    GROUP BY r.bucket
),
bits AS (
    SELECT b.bucket,
           (SELECT coalesce(string_agg(CASE WHEN x.ordinal IS NULL THEN '0' ELSE '1' END, '' ORDER BY g.i), '')
            FROM generate_series(0, w.n - 1) AS g(i)
            LEFT JOIN unnest(u.ordinals) AS x(ordinal) ON x.ordinal = g.i)::varbit AS user_bits
    FROM buckets b
    CROSS JOIN width w
    LEFT JOIN users u ON u.bucket = b.bucket
),
upserted AS (
    INSERT INTO usage_kpi_buckets AS m (bucket, transcriptions, billable_cost_usd, duration_minutes_sum,
                                        duration_minutes_count, user_bits, active_users)
    SELECT b.bucket,
           coalesce(a.transcriptions, 0),
           coalesce(a.billable_cost_usd, 0),
           coalesce(a.duration_minutes_sum, 0),
           coalesce(a.duration_minutes_count, 0),
           b.user_bits,
           bit_count(b.user_bits)
    FROM bits b
    LEFT JOIN agg a USING (bucket)
    ON CONFLICT (bucket) DO UPDATE SET
        transcriptions         = EXCLUDED.transcriptions,
        billable_cost_usd      = EXCLUDED.billable_cost_usd,
        duration_minutes_sum   = EXCLUDED.duration_minutes_sum,
        duration_minutes_count = EXCLUDED.duration_minutes_count,
        user_bits              = EXCLUDED.user_bits,
        active_users           = EXCLUDED.active_users,
        computed_at            = clock_timestamp()
    RETURNING m.bucket
)
SELECT (SELECT count(*) FROM upserted)                    AS buckets_written,
       (SELECT coalesce(sum(transcriptions), 0) FROM agg) AS rows_read;
