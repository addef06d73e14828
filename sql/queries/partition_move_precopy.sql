-- partition_move_precopy: copy one block range of {default} ([%(first_block)s, %(end_block)s), a TID range
-- scan) into {scratch}, the month's future partition, for the rows of [%(start)s, %(end)s). The rows stay in
-- {default}: queries keep seeing each of them exactly once, and nothing is lost if the move stops here
-- (the switch, partition_move_sync_*, makes the copy exact later under lock). Rows already copied by an
-- earlier batch or run are skipped (primary key). Cost: the block range of {default}, index inserts into
-- {scratch}; no lock beyond ACCESS SHARE on {default}: writers go on.
INSERT INTO {scratch}
SELECT * FROM ONLY {default}
WHERE ctid >= format('(%%s,0)', %(first_block)s::bigint)::tid
  AND ctid < format('(%%s,0)', %(end_block)s::bigint)::tid
  AND {key} >= %(start)s AND {key} < %(end)s
ON CONFLICT DO NOTHING
