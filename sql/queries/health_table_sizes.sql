-- health_table_sizes: size of every user table, partitions grouped under their root parent.
--
-- One row per root table (a plain table is its own root; a partitioned table sums all its leaf
-- partitions, whose count is reported). Dead-tuple counts come from pg_stat_user_tables (the
-- cumulative statistics, approximate). Cost: catalog reads plus one stat() per relation file; no
-- locks beyond ACCESS SHARE on the catalogs.
WITH leaf AS (
    SELECT c.oid,
           coalesce(pg_partition_root(c.oid), c.oid) AS root,
           pg_table_size(c.oid)   AS table_bytes,
           pg_indexes_size(c.oid) AS index_bytes,
           greatest(c.reltuples, 0)::bigint AS est_rows
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'm')
      AND c.relpersistence <> 't'  -- other sessions' TEMP tables: sizes can vanish (NULL) mid-query
      AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg\_toast%'
)
SELECT r.relname                                    AS table_name,
       r.relkind = 'p'                              AS partitioned,
       count(*) FILTER (WHERE l.oid <> l.root)      AS partitions,
       sum(l.table_bytes)::bigint                   AS table_bytes,
       sum(l.index_bytes)::bigint                   AS index_bytes,
       sum(l.table_bytes + l.index_bytes)::bigint   AS total_bytes,
       sum(l.est_rows)::bigint                      AS est_rows,
       coalesce(sum(s.n_live_tup), 0)::bigint       AS live_tuples,
       coalesce(sum(s.n_dead_tup), 0)::bigint       AS dead_tuples
FROM leaf l
JOIN pg_class r ON r.oid = l.root
LEFT JOIN pg_stat_user_tables s ON s.relid = l.oid
GROUP BY r.relname, r.relkind
ORDER BY total_bytes DESC, table_name;
