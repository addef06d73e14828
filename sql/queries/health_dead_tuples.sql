-- health_dead_tuples: leaf tables (partitions one by one) with their dead-tuple ratio and last vacuum.
--
-- Ordered by dead tuples, the tables VACUUM would help most first; parent is the root partitioned
-- table (NULL for a plain table). Cost: one read of pg_stat_user_tables; no locks.
SELECT s.relname                                               AS table_name,
       p.relname                                               AS parent,
       s.n_live_tup                                            AS live_tuples,
       s.n_dead_tup                                            AS dead_tuples,
       CASE WHEN s.n_live_tup + s.n_dead_tup > 0
            THEN s.n_dead_tup::float8 / (s.n_live_tup + s.n_dead_tup) ELSE 0 END AS dead_ratio,
       greatest(s.last_vacuum, s.last_autovacuum)              AS last_vacuum,
       greatest(s.last_analyze, s.last_autoanalyze)            AS last_analyze
FROM pg_stat_user_tables s
JOIN pg_class c ON c.oid = s.relid AND c.relkind <> 'p'   -- a partitioned parent holds no rows
LEFT JOIN pg_class p ON p.oid = pg_partition_root(s.relid) AND p.oid <> s.relid
ORDER BY s.n_dead_tup DESC, s.relname
LIMIT %(limit)s;
