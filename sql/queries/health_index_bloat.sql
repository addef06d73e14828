-- health_index_bloat: estimated bloat of the B-tree leaf indexes of the given tables.
--
-- Parameter %(tables)s: text[] of table (leaf or plain) names in the current schema.
-- The estimate compares the index's pages with the pages its live entries need at the index's
-- fillfactor: entries (pg_class.reltuples) × (8-byte tuple header + 4-byte line pointer + the
-- MAXALIGNed average width of the key columns from pg_stats). It is an estimate (the same idea as the
-- well-known ioguix query, simplified): it needs the table ANALYZEd (columns without statistics make
-- the row NULL, and NULL is never reindexed), and it reads no index page, so it costs catalog reads
-- only. Locks: none beyond ACCESS SHARE on the catalogs.
WITH idx AS (
    SELECT ci.oid                   AS index_oid,
           ci.relname               AS index_name,
           ct.relname               AS table_name,
           ci.relpages,
           greatest(ci.reltuples, 0) AS entries,
           coalesce((SELECT substring(o FROM 'fillfactor=([0-9]+)')::int
                     FROM unnest(ci.reloptions) o WHERE o LIKE 'fillfactor=%%'), 90) AS fillfactor,
           x.indkey,
           x.indrelid,
           x.indnkeyatts
    FROM pg_index x
    JOIN pg_class ci ON ci.oid = x.indexrelid
    JOIN pg_class ct ON ct.oid = x.indrelid
    JOIN pg_am am    ON am.oid = ci.relam AND am.amname = 'btree'
    WHERE ct.relname = ANY (%(tables)s::text[])
      AND ct.relnamespace = current_schema()::regnamespace
      AND ci.relkind = 'i'
      AND x.indisvalid
),
width AS (
    -- average key width; an expression column (attnum 0) has its statistics under the index's name
    SELECT i.index_oid,
           sum(ceil(coalesce(s.avg_width, NULL) * (1 - coalesce(s.null_frac, 0)) / 8.0) * 8) AS key_bytes,
           bool_or(s.avg_width IS NULL) AS missing_stats
    FROM idx i
    CROSS JOIN LATERAL generate_series(0, i.indnkeyatts - 1) AS k(pos)
    LEFT JOIN pg_attribute a
           ON i.indkey[k.pos] <> 0 AND a.attrelid = i.indrelid AND a.attnum = i.indkey[k.pos]
    LEFT JOIN pg_attribute ae
           ON i.indkey[k.pos] = 0 AND ae.attrelid = i.index_oid AND ae.attnum = k.pos + 1
    LEFT JOIN pg_stats s
           ON s.schemaname = current_schema()
          AND s.tablename = CASE WHEN a.attnum IS NULL THEN i.index_name ELSE i.table_name END
          AND s.attname = coalesce(a.attname, ae.attname)
          AND NOT s.inherited
    GROUP BY i.index_oid
)
SELECT i.index_name,
       i.table_name,
       i.relpages::bigint * current_setting('block_size')::bigint AS bytes,
       i.entries::bigint                                          AS entries,
       CASE WHEN w.missing_stats OR i.relpages <= 1 THEN NULL
            ELSE greatest(0, 1 - (1 + ceil(i.entries * (12 + w.key_bytes)
                                           / ((current_setting('block_size')::int - 24 - 16)
                                              * i.fillfactor / 100.0)))
                                 / i.relpages)
       END::float8                                                AS bloat_ratio
FROM idx i
JOIN width w ON w.index_oid = i.index_oid
ORDER BY bloat_ratio DESC NULLS LAST, i.index_name;
