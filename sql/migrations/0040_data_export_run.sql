-- 0040_data_export_run: what the export job records about each request, beyond 0001's columns.
--
-- run_id: the Dagster run (or `cli`) that last claimed the request, so a request in the UI leads to its
--   logs and a stuck `running` request can be traced to the run that died.
-- csv_bytes: size of the result as uncompressed CSV (COPY's output), the figure that throughput (MB/s) and
--   the 100 MB benchmark are stated in; `bytes` stays the size of the file on disk.
-- Adding nullable columns without defaults is a catalog-only change (no table rewrite, brief lock).

ALTER TABLE data_export
    ADD COLUMN run_id    text CHECK (char_length(run_id) <= 64),
    ADD COLUMN csv_bytes bigint CHECK (csv_bytes >= 0);
