-- 0060_audit_writer_metrics: each platform process's AuditWriter publishes its counters here
-- (one upsert per writer every ~15 s, from its flusher thread), so the db_health_report, which runs in a
-- Dagster process, can show the writers of every platform process: queued, written, spooled, dropped …
CREATE TABLE audit_writer_metrics (
    writer       text        PRIMARY KEY,          -- host:pid:name
    updated_at   timestamptz NOT NULL DEFAULT now(),
    metrics      jsonb       NOT NULL
);
