-- health_probe_params: realistic arguments for the latency probes, taken from the live data.
--
-- The most recent audit event that names a user and an entity gives the user of the "latest events of
-- a user" lookup and the entity of the "history of an entity" lookup, and the most recent usage row
-- gives the user of "usage by user". Cost: three index-ordered LIMIT 1 reads (the newest partition
-- first); no locks.
SELECT (SELECT user_id FROM audit_log WHERE user_id IS NOT NULL ORDER BY "timestamp" DESC LIMIT 1) AS audit_user_id,
       e.entity_type,
       e.entity_id,
       (SELECT user_id FROM usage_log ORDER BY created_at DESC LIMIT 1)                       AS usage_user_id
FROM (SELECT 1) one
LEFT JOIN LATERAL (
    SELECT entity_type, entity_id FROM audit_log
    WHERE entity_type IS NOT NULL AND entity_id IS NOT NULL
    ORDER BY "timestamp" DESC LIMIT 1
) e ON true;
