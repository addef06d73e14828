-- health_probe_params: realistic arguments for the latency probes, taken from the live data, cheaply.
--
-- audit_log has no index on "timestamp" alone and usage_log only a BRIN one, so "the newest row" would
-- sort a whole table (seconds at 10M rows). Instead: the newest high/critical audit event (read backwards
-- from idx_audit_log_critical_events, a few rows) names the user and the entity of the audit lookups, and
-- any usage row of the last hour (partition pruning + BRIN, no sort) the user of "usage by user". Each
-- falls back to the first row found anywhere (a LIMIT 1 scan that stops at once).
-- Cost: a few index or heap pages; no locks beyond ACCESS SHARE.
WITH recent_event AS (
    SELECT user_id, entity_type, entity_id FROM audit_log
    WHERE severity IN ('high', 'critical') AND "timestamp" >= now() - interval '30 days'
      AND user_id IS NOT NULL AND entity_type IS NOT NULL AND entity_id IS NOT NULL
    ORDER BY "timestamp" DESC
    LIMIT 1
), any_event AS (
    SELECT user_id, entity_type, entity_id FROM audit_log
    WHERE user_id IS NOT NULL AND entity_type IS NOT NULL AND entity_id IS NOT NULL
    LIMIT 1
)
SELECT coalesce((SELECT user_id FROM recent_event), (SELECT user_id FROM any_event))         AS audit_user_id,
       coalesce((SELECT entity_type FROM recent_event), (SELECT entity_type FROM any_event)) AS entity_type,
       coalesce((SELECT entity_id FROM recent_event), (SELECT entity_id FROM any_event))     AS entity_id,
       coalesce((SELECT user_id FROM usage_log WHERE created_at >= now() - interval '1 hour' LIMIT 1),
                (SELECT user_id FROM usage_log LIMIT 1))                                    AS usage_user_id;
