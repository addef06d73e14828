-- 0001_core_schema: the platform tables this project keeps fast.
--
-- audit_log and usage_log are range-partitioned by month (partitions are created by
-- perf_pipeline.lib.partitioning, named audit_log_y2025m08 / usage_log_y2025m08) and each has a DEFAULT
-- partition that must stay empty (asset check *_default_partition_empty). Primary keys include the
-- partition key, as PostgreSQL requires for partitioned tables.
--
-- usage_log.session_id is deliberately not a foreign key: usage_log is an append-only log loaded with
-- COPY, and a per-row FK trigger would cost more than the insert itself; sessions and usage have
-- independent retention.

CREATE TABLE session (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid        NOT NULL,
    title        text        NOT NULL DEFAULT '' CHECK (char_length(title) <= 500),
    status       text        NOT NULL DEFAULT 'created'
                             CHECK (status IN ('created', 'processing', 'completed', 'failed')),
    stt_provider text        CHECK (stt_provider ~ '^[a-z0-9_-]{1,32}$'),
    duration     integer     CHECK (duration >= 0),           -- seconds of audio
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (updated_at >= created_at)
);
COMMENT ON COLUMN session.duration IS 'audio duration in seconds';
CREATE INDEX idx_session_user_created ON session (user_id, created_at DESC);
CREATE INDEX idx_session_created ON session (created_at);
-- KPI "active transcriptions" and "error rate": tiny partial indexes over the few live/failed rows
CREATE INDEX idx_session_processing ON session (created_at) WHERE status = 'processing';
CREATE INDEX idx_session_failed_updated ON session (updated_at) WHERE status = 'failed';

CREATE TABLE usage_log (
    id               bigserial,
    user_id          uuid          NOT NULL,
    session_id       uuid,
    created_at       timestamptz   NOT NULL DEFAULT now(),
    duration_minutes numeric(10,2) NOT NULL CHECK (duration_minutes >= 0),
    cost_usd         numeric(12,4) NOT NULL DEFAULT 0 CHECK (cost_usd >= 0),
    is_billable      boolean       NOT NULL DEFAULT true,
    stt_provider     text          NOT NULL CHECK (stt_provider ~ '^[a-z0-9_-]{1,32}$'),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE usage_log_default PARTITION OF usage_log DEFAULT;
CREATE INDEX idx_usage_log_user_created ON usage_log (user_id, created_at DESC);
CREATE INDEX idx_usage_log_billing_analysis ON usage_log (created_at, is_billable, stt_provider)
    WHERE is_billable = true;
-- day/hour range scans (rollups, KPIs) on an append-only log: a BRIN index costs almost nothing to keep
CREATE INDEX idx_usage_log_created_brin ON usage_log USING brin (created_at);

CREATE TABLE audit_log (
    id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    "timestamp" timestamptz NOT NULL DEFAULT now(),
    user_id     uuid,
    entity_type text        CHECK (char_length(entity_type) <= 64),
    entity_id   text        CHECK (char_length(entity_id) <= 128),
    event_type  text        NOT NULL CHECK (char_length(event_type) BETWEEN 1 AND 64),
    operation   text        NOT NULL CHECK (char_length(operation) BETWEEN 1 AND 32),
    severity    text        NOT NULL DEFAULT 'low' CHECK (severity IN ('low', 'medium', 'high', 'critical')),
    description text        CHECK (char_length(description) <= 2000),
    details     jsonb,
    ip          inet,
    PRIMARY KEY (id, "timestamp")
) PARTITION BY RANGE ("timestamp");
CREATE TABLE audit_log_default PARTITION OF audit_log DEFAULT;
CREATE INDEX idx_audit_log_user_timestamp ON audit_log (user_id, "timestamp" DESC)
    WHERE user_id IS NOT NULL;
CREATE INDEX idx_audit_log_entity_timestamp ON audit_log (entity_type, entity_id, "timestamp" DESC)
    WHERE entity_type IS NOT NULL;
CREATE INDEX idx_audit_log_critical_events ON audit_log ("timestamp" DESC)
    WHERE severity IN ('high', 'critical');

-- Export requests, written by the platform, processed by the export sensor/job.
-- kind/format/filters are validated by the export job (a bad request ends as `failed` with a reason),
-- not by constraints, so that the platform can always file a request.
CREATE TABLE data_export (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    requested_by uuid        NOT NULL,
    kind         text        NOT NULL,
    format       text        NOT NULL,
    filters      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status       text        NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'running', 'succeeded', 'failed')),
    requested_at timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    file_path    text,
    rows         bigint      CHECK (rows >= 0),
    bytes        bigint      CHECK (bytes >= 0),
    sha256       text        CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    error        text,
    attempts     integer     NOT NULL DEFAULT 0,
    CHECK (status <> 'succeeded' OR (file_path IS NOT NULL AND sha256 IS NOT NULL))
);
CREATE INDEX idx_data_export_pending ON data_export (requested_at) WHERE status = 'pending';
CREATE INDEX idx_data_export_requested_by ON data_export (requested_by, requested_at DESC);
