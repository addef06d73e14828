-- health_slow_statements: the statements of this database with the highest mean execution time.
--
-- pg_stat_statements ≥ 1.8 (PostgreSQL 13+) names its timing columns *_exec_time (older examples'
-- mean_time/max_time were renamed then). Raises ObjectNotInPrerequisiteState when the library is not in
-- shared_preload_libraries and UndefinedTable when the extension is not installed: the caller turns
-- both into a report line. Cost: one read of the extension's shared hash table; no locks.
SELECT s.calls,
       s.mean_exec_time   AS mean_ms,
       s.max_exec_time    AS max_ms,
       s.total_exec_time  AS total_ms,
       s.rows,
       left(regexp_replace(s.query, '\s+', ' ', 'g'), 200) AS query
FROM pg_stat_statements s
WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY s.mean_exec_time DESC
LIMIT %(limit)s;
