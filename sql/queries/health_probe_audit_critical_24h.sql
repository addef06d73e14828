-- health_probe_audit_critical_24h: the audit views' lookup "high and critical events, last 24 h".
--
-- Budget: PERF_PIPELINE_AUDIT_BUDGET_MS. Needs idx_audit_log_critical_events (timestamp DESC) WHERE
-- severity IN ('high', 'critical'): the predicate repeats the index's so the planner can use it.
SELECT id, "timestamp", user_id, entity_type, entity_id, event_type, severity, description
FROM audit_log
WHERE severity IN ('high', 'critical')
  AND "timestamp" >= now() - interval '24 hours'
ORDER BY "timestamp" DESC
LIMIT 500;
