-- health_index_usage: scans and size of every index, partition indexes grouped under the parent index.
--
-- An index is flagged unused when it was never scanned since the statistics were last reset and it
-- enforces nothing: primary keys, unique and exclusion indexes, and indexes backing a constraint are
-- needed even if no query reads them, so they are never flagged. Cost: one read of
-- pg_stat_user_indexes and the index catalogs; no locks.
WITH leaf AS (
    SELECT s.indexrelid,
           coalesce(pg_partition_root(s.indexrelid), s.indexrelid) AS root,
           s.idx_scan,
           pg_relation_size(s.indexrelid) AS bytes
    FROM pg_stat_user_indexes s
)
SELECT ri.relname                                      AS index_name,
       rt.relname                                      AS table_name,
       count(*)                                        AS leaf_indexes,
       sum(l.idx_scan)::bigint                         AS scans,
       sum(l.bytes)::bigint                            AS bytes,
       (x.indisprimary OR x.indisunique OR x.indisexclusion
        OR EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid)) AS enforces_constraint,
       (sum(l.idx_scan) = 0
        AND NOT (x.indisprimary OR x.indisunique OR x.indisexclusion
                 OR EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid))) AS unused
FROM leaf l
JOIN pg_index x  ON x.indexrelid = l.root
JOIN pg_class ri ON ri.oid = x.indexrelid
JOIN pg_class rt ON rt.oid = x.indrelid
GROUP BY ri.relname, rt.relname, x.indexrelid, x.indisprimary, x.indisunique, x.indisexclusion
ORDER BY unused DESC, bytes DESC, index_name;
