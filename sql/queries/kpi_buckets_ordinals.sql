-- kpi_buckets_ordinals: number the users of usage_log's rows in the given buckets that have no ordinal
-- yet (usage_user_ordinals, 0080), before the buckets are computed.
--
-- NOT EXISTS first: an identity value is drawn for every row offered to INSERT, even one that ON
-- CONFLICT then skips, and gaps would widen every bitmap for good. ON CONFLICT stays for safety; the
-- sealing holds its advisory lock, so no other writer races it. Cost: one range scan of [lo, hi), the
-- span of the buckets (parameters known at plan time: partitions pruned, rows estimated).
INSERT INTO usage_user_ordinals (user_id)
SELECT DISTINCT l.user_id
FROM usage_log l
WHERE l.created_at >= %(lo)s
  AND l.created_at < %(hi)s
  AND usage_kpi_bucket_of(l.created_at) = ANY(%(buckets)s::timestamptz[])
  AND NOT EXISTS (SELECT 1 FROM usage_user_ordinals o WHERE o.user_id = l.user_id)
ORDER BY l.user_id
ON CONFLICT (user_id) DO NOTHING;
