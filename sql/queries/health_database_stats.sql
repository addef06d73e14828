-- health_database_stats: connections (this database and the whole server), transactions and cache.
--
-- rollback_ratio = rollbacks / (commits + rollbacks) since the statistics reset (alerting above
-- 10 %); cache_hit_ratio = shared-buffer hits / block reads. Cost: one read of pg_stat_activity and
-- pg_stat_database; no locks.
SELECT (SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND backend_type = 'client backend')        AS connections,
       (SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND state = 'active'
           AND backend_type = 'client backend')                                        AS active,
       (SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND state IN ('idle in transaction', 'idle in transaction (aborted)'))     AS idle_in_transaction,
       (SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock')               AS waiting_on_locks,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')    AS server_connections,
       current_setting('max_connections')::int                                         AS max_connections,
       d.xact_commit                                                                   AS commits,
       d.xact_rollback                                                                 AS rollbacks,
       CASE WHEN d.xact_commit + d.xact_rollback > 0
            THEN d.xact_rollback::float8 / (d.xact_commit + d.xact_rollback) ELSE 0 END AS rollback_ratio,
       CASE WHEN d.blks_hit + d.blks_read > 0
            THEN d.blks_hit::float8 / (d.blks_hit + d.blks_read) ELSE 1 END             AS cache_hit_ratio,
       d.deadlocks,
       pg_database_size(current_database())                                            AS database_bytes
FROM pg_stat_database d
WHERE d.datname = current_database();
