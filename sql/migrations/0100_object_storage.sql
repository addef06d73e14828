-- 0100_object_storage: archives and exports may live on object storage (perf_pipeline.lib.storage).
--
-- archive_manifest.file_path and data_export.file_path hold where the file is: a local path, as before,
-- or an s3://bucket/key URI. New columns, all nullable (catalog-only change, no rewrite, brief lock):
--   archive_manifest.etag         the store's ETag of the object as last read back (S3), or for a local file
--                                 local:<mtime ns>:<inode>: any rewrite of the object changes it
--   archive_manifest.version_id   the S3 VersionId when the bucket keeps versions
--   archive_manifest.verified_at  when the object was last read back in full and matched (sha256, rows): the
--                                 files check re-reads only new or changed objects (size, ETag) and those not
--                                 read in full for a week; NULL (rows from before this migration) = due now
--   data_export.etag              the ETag of the export's object when it was written (the download API
--                                 answers 410 when the object is gone or no longer that one)
ALTER TABLE archive_manifest
    ADD COLUMN etag        text CHECK (char_length(etag) <= 200),
    ADD COLUMN version_id  text CHECK (char_length(version_id) <= 1024),
    ADD COLUMN verified_at timestamptz;

ALTER TABLE data_export
    ADD COLUMN etag text CHECK (char_length(etag) <= 200);
