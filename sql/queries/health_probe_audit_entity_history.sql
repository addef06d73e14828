-- health_probe_audit_entity_history: the audit views' lookup "history of one entity".
--
-- Budget: PERF_PIPELINE_AUDIT_BUDGET_MS. Needs idx_audit_log_entity_timestamp
-- (entity_type, entity_id, timestamp DESC).
SELECT id, "timestamp", user_id, event_type, operation, severity, description
FROM audit_log
WHERE entity_type = %(entity_type)s AND entity_id = %(entity_id)s
ORDER BY "timestamp" DESC
LIMIT 100;
