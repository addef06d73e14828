-- 0091_data_export_running: the export sensor looks for `running` requests whose worker is gone on every
-- tick (sql/queries/export_orphaned_requests.sql). data_export keeps every request ever filed and only a
-- handful run at once: a partial index keeps that lookup to those few rows.
-- A plain CREATE INDEX (SHARE lock: new requests wait while data_export is indexed, a one-pass build over a
-- small table). Not CONCURRENTLY: it waits for every older transaction, including a second migration
-- runner waiting on the migrations' advisory lock, which this runner holds — a deadlock.
CREATE INDEX idx_data_export_running ON data_export (id) WHERE status = 'running';
