-- 0021_usage_rollup_stale_days: late-data detection for the daily usage rollup (issue 4).
--
-- A row of usage_log inserted, updated or deleted for a PAST UTC day (created_at before today 00:00Z,
-- by the statement's clock) marks its day in usage_rollup_stale_days; the sensor
-- `usage_daily_metrics_late_data_sensor` re-materializes exactly the marked days that are already
-- rolled up, and the rollup clears the marks of its window before it reads usage_log.
-- Rows of the current day are not marked: today is recomputed every 30 minutes and closed at 02:00.
--
-- Why row triggers with a WHEN clause (and not a statement trigger with transition tables): the WHEN
-- test is evaluated inline by the executor for every row, costs a timestamp comparison, and queues
-- nothing when false, so the normal write path (COPY or single rows of "now") pays ~nothing; a
-- transition table would copy every inserted row into a tuplestore and run PL/pgSQL per statement.
-- Only late rows run the function, and only the first late row of each day in a transaction writes
-- (the days already marked by the transaction are remembered in a transaction-local setting).
--
-- Correctness under concurrency (no lost late row):
--   * the first late row of a day in a transaction either inserts the mark (uncommitted: nobody can
--     delete it) or takes FOR KEY SHARE on the existing mark, held until the writer commits;
--   * the rollup deletes the marks of its window in a short transaction of its own (the DELETE waits
--     for those writers to commit), then computes from a snapshot taken after that, so every late row
--     either is in the snapshot or has left a mark that survives for the next run.
--   FOR KEY SHARE locks do not conflict with one another: concurrent late writers never wait for each
--   other, only (briefly) for the rollup's DELETE.

CREATE TABLE usage_rollup_stale_days (
    day       date        PRIMARY KEY,
    marked_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE usage_rollup_stale_days IS
    'UTC days of usage_log changed after their day ended; cleared by the usage_daily_metrics rollup.';

-- Marks day d for the current transaction (see above). Called once per (transaction, day).
CREATE FUNCTION usage_rollup_mark_stale_day(d date) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    LOOP
        INSERT INTO usage_rollup_stale_days (day) VALUES (d) ON CONFLICT (day) DO NOTHING;
        EXIT WHEN FOUND;  -- our own uncommitted mark
        PERFORM 1 FROM usage_rollup_stale_days WHERE day = d FOR KEY SHARE;
        EXIT WHEN FOUND;  -- an existing mark, now locked until we commit
        -- the mark was deleted between the two statements (a rollup claimed it): insert again
    END LOOP;
    -- remembered for the rest of the transaction (set_config(..., true) is rolled back with it)
    PERFORM set_config('perf_pipeline.stale_days_marked',
                       coalesce(current_setting('perf_pipeline.stale_days_marked', true), '') || d::text || ',',
                       true);
END;
$$;

-- Runs only for late rows (the triggers' WHEN). The already-marked test is a plain expression
-- (PL/pgSQL's fast path, no SQL round trip), so a bulk late load pays one string search per row.
CREATE FUNCTION usage_log_mark_stale_days() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    today timestamptz := date_trunc('day', statement_timestamp(), 'UTC');
    seen  text := coalesce(current_setting('perf_pipeline.stale_days_marked', true), '');
    d     date;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.created_at < today THEN
        d := (OLD.created_at AT TIME ZONE 'UTC')::date;
        IF position(d::text IN seen) = 0 THEN
            PERFORM usage_rollup_mark_stale_day(d);
            seen := current_setting('perf_pipeline.stale_days_marked', true);
        END IF;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.created_at < today THEN
        d := (NEW.created_at AT TIME ZONE 'UTC')::date;
        IF position(d::text IN seen) = 0 THEN
            PERFORM usage_rollup_mark_stale_day(d);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

-- Row triggers on the partitioned parent are cloned onto every partition, present and future.
CREATE TRIGGER usage_log_late_insert
    AFTER INSERT ON usage_log FOR EACH ROW
    WHEN (NEW.created_at < date_trunc('day', statement_timestamp(), 'UTC'))
    EXECUTE FUNCTION usage_log_mark_stale_days();

CREATE TRIGGER usage_log_late_update
    AFTER UPDATE ON usage_log FOR EACH ROW
    WHEN (OLD.created_at < date_trunc('day', statement_timestamp(), 'UTC')
          OR NEW.created_at < date_trunc('day', statement_timestamp(), 'UTC'))
    EXECUTE FUNCTION usage_log_mark_stale_days();

CREATE TRIGGER usage_log_late_delete
    AFTER DELETE ON usage_log FOR EACH ROW
    WHEN (OLD.created_at < date_trunc('day', statement_timestamp(), 'UTC'))
    EXECUTE FUNCTION usage_log_mark_stale_days();

-- TRUNCATE removes every day at once: mark every day already rolled up.
CREATE FUNCTION usage_log_mark_all_rolled_up_days() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_rollup_stale_days (day)
    SELECT day FROM usage_daily_metrics WHERE sessions > 0
    ON CONFLICT (day) DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER usage_log_truncate
    AFTER TRUNCATE ON usage_log FOR EACH STATEMENT
    EXECUTE FUNCTION usage_log_mark_all_rolled_up_days();
