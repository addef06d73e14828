-- export_orphaned_requests: `running` export requests whose worker is gone, and the server's clock.
--
-- A worker holds its request's session advisory lock (two-key form: classid = 'expo', objid = id mod
-- 2^31-1) from before it claims the request until after it records the outcome, and the lock dies with its
-- PostgreSQL session. So a `running` request whose lock nobody holds was left by a process that was killed,
-- ran out of memory or lost its connection. pg_locks is only read (no lock is taken, a worker starting now
-- is never disturbed); it is read once (MATERIALIZED), not once per request. The running requests come
-- from the partial index idx_data_export_running. Always one row at least: the clock, with NULLs when
-- nothing is orphaned.
WITH held AS MATERIALIZED (
    SELECT objid::bigint AS key
    FROM pg_locks
    WHERE locktype = 'advisory'
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid = %(lock_class)s::bigint::oid
      AND objsubid = 2
      AND granted
),
orphaned AS (
    SELECT id, attempts, run_id
    FROM data_export
    WHERE status = 'running'
      AND mod(id, 2147483647) NOT IN (SELECT key FROM held)
)
SELECT extract(epoch FROM now())::float8 AS now, o.id, o.attempts, o.run_id
FROM (VALUES (1)) AS one (x)
LEFT JOIN orphaned AS o ON true
ORDER BY o.id
