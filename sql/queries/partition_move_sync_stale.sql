-- partition_move_sync_stale: the first half of making {scratch} exactly {default}'s rows of one month, run
-- in the switch transaction (writers of the parent blocked, {default} locked): delete from the copy every
-- row that is no longer in {default} as it is now (deleted or updated since it was copied). Cost: one scan
-- of {scratch} and a primary-key probe into {default} per row.
DELETE FROM {scratch} s
WHERE NOT EXISTS (
    SELECT 1 FROM ONLY {default} d
    WHERE ({pk_d}) = ({pk_s}) AND ROW(d.*) IS NOT DISTINCT FROM ROW(s.*)
)
