"""Archive old monthly partitions to verified Parquet files, restore them, and decide usage retention.

Modules: :mod:`.manifest` (the ``archive_manifest`` rows and their :class:`State`), :mod:`.files` (write,
read back and check a month's Parquet file; the files check), :mod:`.run` (:func:`archive_partition`),
:mod:`.restore` (:func:`restore_partition`) and :mod:`.retention` (usage retention).

One month moves through four steps, each recorded in ``archive_manifest`` in the same transaction as
the step itself (or, for the file, right after its atomic rename), so a crash or kill at any point is
finished by calling :func:`archive_partition` again for the same month:

1. **detach** the partition from its parent. ``DETACH PARTITION … CONCURRENTLY`` is refused while the
   parent has a DEFAULT partition (ours always do: the default guard needs one), so the detach is the
   plain one: a catalog-only change (no scan) that holds ACCESS EXCLUSIVE on the parent for a few
   milliseconds, taken with a short ``lock_timeout`` (100 ms) and retried, so a writer queued behind it
   waits at most about ``lock_timeout``. Without a DEFAULT partition the CONCURRENTLY form is used.
2. **export**: ``COPY (SELECT …) TO STDOUT (FORMAT csv)`` in physical order (no sort: the detached table
   no longer changes and ``synchronize_seqscans`` is off, so restore → re-archive gives the same file), cut into ~16 MiB
   record-aligned batches, parsed by pyarrow (:mod:`perf_pipeline.lib.pgcsv`, shared with the exports)
   and appended to a zstd Parquet file (one row group per batch) written atomically to the archive
   location (:mod:`perf_pipeline.lib.storage`: a folder, or an S3 bucket prefix, where the object appears
   under its final key only complete), hashed on the way: memory stays bounded by the batch size.
   The manifest records its URI, size, sha256 and the store's ETag (and VersionId).
3. **verify**: the object is read back from the store (size, sha256, Parquet schema, row count, min/max
   timestamp) and compared with the manifest and with the detached table.
4. **drop** the table (standalone by now, so no lock on the parent), only if it is still standalone and
   holds exactly the exported row count (checked under its ACCESS EXCLUSIVE lock, taken with a
   ``lock_timeout``). Export, verify and drop also refuse a table that was attached again meanwhile.
   The drop relies on a file only if the same run read it back and matched it (size, sha256, rows,
   min/max) against the manifest and the table: a run that resumes at ``verified`` verifies again
   first, and a file found missing or damaged sends the month back to export, never to the drop.

A month whose manifest says ``dropped`` is never archived twice; ``restored`` starts over.
Concurrent runs of the same month are serialized by an advisory lock.
"""

from perf_pipeline.lib.archive.files import (
    BATCH_BYTES,
    REHASH_AFTER,
    SETTING,
    ArchiveLocation,
    FileFacts,
    VerifyReport,
    archive_key,
    archive_path,
    file_sha256,
    read_file_facts,
    table_columns,
    verify_archives,
)
from perf_pipeline.lib.archive.manifest import (
    UNFINISHED,
    ArchiveError,
    Attachment,
    ManifestRow,
    State,
    list_manifest,
    manifest_row,
)
from perf_pipeline.lib.archive.restore import RestoreResult, restore_partition
from perf_pipeline.lib.archive.retention import RetentionDecision, archive_eligible, usage_retention_decision
from perf_pipeline.lib.archive.run import (
    DETACH_LOCK_TIMEOUT_MS,
    DROP_LOCK_TIMEOUT_MS,
    STEPS,
    VERIFY_ATTEMPTS,
    ArchiveResult,
    StepHook,
    archive_partition,
)
from perf_pipeline.lib.calendar import add_months

__all__ = [
    "BATCH_BYTES",
    "DETACH_LOCK_TIMEOUT_MS",
    "DROP_LOCK_TIMEOUT_MS",
    "REHASH_AFTER",
    "SETTING",
    "STEPS",
    "UNFINISHED",
    "VERIFY_ATTEMPTS",
    "ArchiveError",
    "ArchiveLocation",
    "ArchiveResult",
    "Attachment",
    "FileFacts",
    "ManifestRow",
    "RestoreResult",
    "RetentionDecision",
    "State",
    "StepHook",
    "VerifyReport",
    "add_months",
    "archive_eligible",
    "archive_key",
    "archive_partition",
    "archive_path",
    "file_sha256",
    "list_manifest",
    "manifest_row",
    "read_file_facts",
    "restore_partition",
    "table_columns",
    "usage_retention_decision",
    "verify_archives",
]
