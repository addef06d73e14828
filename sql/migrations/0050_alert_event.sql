-- 0050_alert_event: alerts raised by the Dagster alert sensors (failed runs, failed asset checks).
--
-- alert_key is the idempotency key (`run_failure:<run_id>`, `check_failure:<event storage id>`): a
-- sensor tick that is retried, or two sensors racing, insert one row per failure, never two
-- (INSERT … ON CONFLICT (alert_key) DO NOTHING). webhook_status records whether the optional webhook
-- (PERF_PIPELINE_ALERT_WEBHOOK_URL) got it, so an operator can see undelivered alerts.
CREATE TABLE alert_event (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_key      text        NOT NULL UNIQUE CHECK (char_length(alert_key) <= 300),
    kind           text        NOT NULL CHECK (kind IN ('run_failure', 'check_failure')),
    source         text        NOT NULL CHECK (char_length(source) <= 500),   -- job name or asset:check
    message        text        NOT NULL,
    details        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    raised_at      timestamptz NOT NULL DEFAULT now(),
    webhook_status text        NOT NULL DEFAULT 'disabled'
                               CHECK (webhook_status IN ('disabled', 'pending', 'sent', 'failed')),
    webhook_error  text
);
CREATE INDEX idx_alert_event_raised ON alert_event (raised_at DESC);
