-- kpi_buckets_reconcile: the given KPI buckets that are not exactly usage_log's numbers.
--
-- Independent of kpi_buckets_seal.sql: a plain GROUP BY per bucket, distinct users counted by user_id,
-- and every user of the bucket checked against its bit (equal counts + every user's bit set = equal
-- sets). A missing bucket is a mismatch. Run on the sealing's own snapshot. Cost: one range scan of
-- [lo, hi), the span of the buckets.
WITH buckets AS (
    SELECT DISTINCT unnest(%(buckets)s::timestamptz[]) AS bucket
),
rows_ AS MATERIALIZED (
    SELECT date_bin('5 minutes', l.created_at, '2000-01-01 00:00:00+00'::timestamptz) AS bucket,
           l.user_id, l.cost_usd, l.is_billable, l.duration_minutes
    FROM usage_log l
    WHERE l.created_at >= %(lo)s
      AND l.created_at < %(hi)s
),
expected AS (
    SELECT b.bucket,
           count(l.bucket)                                           AS transcriptions,
           coalesce(sum(l.cost_usd) FILTER (WHERE l.is_billable), 0) AS billable_cost_usd,
           coalesce(sum(l.duration_minutes), 0)                      AS duration_minutes_sum,
           count(l.duration_minutes)                                 AS duration_minutes_count,
           count(DISTINCT l.user_id)                                 AS active_users
    FROM buckets b
    LEFT JOIN rows_ l ON l.bucket = b.bucket
    GROUP BY b.bucket
),
bits_ok AS (
    SELECT b.bucket,
           coalesce(bool_and(o.ordinal IS NOT NULL
                             AND o.ordinal < length(m.user_bits)
                             AND get_bit(m.user_bits, o.ordinal) = 1)
                        FILTER (WHERE l.user_id IS NOT NULL), true) AS all_set
    FROM buckets b
    JOIN usage_kpi_buckets m ON m.bucket = b.bucket
    LEFT JOIN rows_ l ON l.bucket = b.bucket
    LEFT JOIN usage_user_ordinals o ON o.user_id = l.user_id
    GROUP BY b.bucket
)
SELECT e.bucket,
       e.transcriptions          AS expected_transcriptions,
       m.transcriptions          AS bucket_transcriptions,
       e.billable_cost_usd       AS expected_billable_cost_usd,
       m.billable_cost_usd       AS bucket_billable_cost_usd,
       e.active_users            AS expected_active_users,
       m.active_users            AS bucket_active_users
FROM expected e
LEFT JOIN usage_kpi_buckets m ON m.bucket = e.bucket
LEFT JOIN bits_ok b ON b.bucket = e.bucket
WHERE m.bucket IS NULL
   OR m.transcriptions         IS DISTINCT FROM e.transcriptions
   OR m.billable_cost_usd      IS DISTINCT FROM e.billable_cost_usd
   OR m.duration_minutes_sum   IS DISTINCT FROM e.duration_minutes_sum
   OR m.duration_minutes_count IS DISTINCT FROM e.duration_minutes_count
   OR m.active_users           IS DISTINCT FROM e.active_users
   OR NOT b.all_set
ORDER BY e.bucket;
