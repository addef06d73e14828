-- 0092_alert_event_stale_asset: alerts for assets whose freshness policy fails or warns (sensor
-- alert_on_stale_asset reads Dagster's freshness state changes), next to failed runs and checks.
-- Replacing a CHECK constraint on a small table: brief ACCESS EXCLUSIVE, one validation scan.
ALTER TABLE alert_event DROP CONSTRAINT alert_event_kind_check;
ALTER TABLE alert_event ADD CONSTRAINT alert_event_kind_check
    CHECK (kind IN ('run_failure', 'check_failure', 'stale_asset'));
