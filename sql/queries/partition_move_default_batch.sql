-- partition_move_default_batch: move up to %(batch)s rows of one month from DEFAULT into that month's
-- (still standalone) partition table, atomically: the DELETE and the INSERT commit together, so every
-- row is in exactly one of the two tables at any commit. Returns the number of rows moved (0 = done).
-- SKIP LOCKED lets a re-run or a concurrent mover proceed past rows another transaction is moving.
WITH picked AS (
    SELECT ctid FROM {default}
    WHERE {key} >= %(start)s AND {key} < %(end)s
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
), moved AS (
    DELETE FROM {default} d USING picked WHERE d.ctid = picked.ctid
    RETURNING d.*
), inserted AS (
    INSERT INTO {target} SELECT * FROM moved RETURNING 1
)
SELECT count(*) FROM inserted
