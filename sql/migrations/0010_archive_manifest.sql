-- 0010_archive_manifest: one row per archived (or being archived) monthly partition.
--
-- perf_pipeline.lib.archive moves a month through these states, each recorded in the same transaction
-- as the step it names, so a crash at any point is finished by re-running the same month:
--   detached  the partition is detached from its parent (a standalone table, rows intact)
--   exported  the Parquet file is written, fsynced and renamed into place; rows/bytes/sha256/min/max recorded
--   verified  the file was re-read: sha256, row count and min/max timestamp match the table
--   dropped   the table is dropped; the file (checked by the archive verification check) is the only copy
--   restored  the file was loaded back and the table re-attached; archiving it again starts over
CREATE TABLE archive_manifest (
    table_name     text        NOT NULL CHECK (table_name IN ('audit_log', 'usage_log')),
    month          date        NOT NULL CHECK (extract(day FROM month) = 1),
    partition_name text        NOT NULL,
    state          text        NOT NULL CHECK (state IN ('detached', 'exported', 'verified', 'dropped', 'restored')),
    file_path      text,
    rows           bigint      CHECK (rows >= 0),
    bytes          bigint      CHECK (bytes >= 0),
    sha256         text        CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    min_ts         timestamptz,
    max_ts         timestamptz,
    started_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    dropped_at     timestamptz,
    restored_at    timestamptz,
    archive_count  integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (table_name, month),
    CHECK (state NOT IN ('exported', 'verified', 'dropped')
           OR (file_path IS NOT NULL AND rows IS NOT NULL AND sha256 IS NOT NULL))
);
