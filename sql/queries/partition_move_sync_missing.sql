-- partition_move_sync_missing: the second half (after partition_move_sync_stale, same transaction): copy the
-- rows of [%(start)s, %(end)s) that {default} has and {scratch} does not (written or updated since the
-- pre-copy). Cost: one scan of {default} and a primary-key probe into {scratch} per row of the month.
INSERT INTO {scratch}
SELECT d.* FROM ONLY {default} d
WHERE d.{key} >= %(start)s AND d.{key} < %(end)s
  AND NOT EXISTS (SELECT 1 FROM {scratch} s WHERE ({pk_s}) = ({pk_d}))
