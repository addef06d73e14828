-- 0051_pg_stat_statements: install the pg_stat_statements extension where the server offers it.
--
-- The health report (db_health_report) reads the top slow statements from it. The view only returns
-- rows when the library is also in shared_preload_libraries (the embedded server preloads it); when it
-- is not, or the extension cannot be installed (not shipped, or no privilege), the report says so in a
-- clear line instead of failing, so this migration never fails on those grounds either.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_stat_statements') THEN
        CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'pg_stat_statements not installed: %', SQLERRM;
END
$$;
