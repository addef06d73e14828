-- health_probe_audit_user_latest: the audit views' lookup "latest 100 events of a user".
--
-- Budget: PERF_PIPELINE_AUDIT_BUDGET_MS. Needs idx_audit_log_user_timestamp (user_id, timestamp DESC):
-- a Merge Append of per-partition index scans that stops after 100 rows.
SELECT id, "timestamp", entity_type, entity_id, event_type, operation, severity, description
FROM audit_log
WHERE user_id = %(user_id)s
ORDER BY "timestamp" DESC
LIMIT 100;
