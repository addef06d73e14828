-- 0080_usage_kpi_buckets: usage_log pre-aggregated in closed 5-minute buckets for the real-time KPIs, so
-- a KPI cache miss no longer reads every usage row of the last 24 hours.
--
-- Why: dashboard_kpis aggregated the whole 24-hour window of usage_log on every miss, a cost that
-- grows with the rows per day: at 100M audit / 20M usage rows it took 25–32 ms against 4–7 ms at 1M
-- (bench.scale, ratio 4.7–6.2; most of it the exact count of distinct users over 27k rows). With this
-- table a miss reads one row per sealed bucket of the window (288 a day) and only minutes of usage_log
-- rows: the partial buckets at the window's ends, the bucket the last hour starts in, and the newest
-- buckets not sealed yet. Distinct users are the OR of one bitmap per bucket. Hourly buckets were tried
-- first: their partial hours still left up to two hours of rows to read per miss.
--
-- Exactness. A bucket holds exactly usage_log's rows of its 5 minutes as of the snapshot that computed
-- it. Readers trust a bucket only while no late-data mark exists for it (usage_kpi_stale_buckets) and
-- only within the horizon (usage_kpi_bucket_horizon() back from the current bucket, minus one bucket
-- of margin): a row written into an earlier bucket of the horizon marks that bucket in the same
-- transaction (triggers below, the protocol of 0021), so a reader's snapshot sees either the old bucket
-- and its mark, or the recomputed bucket. A bucket without a trusted row is read from usage_log, so
-- the KPIs are always usage_log's numbers; the buckets only make them cheaper.
-- The triggers compare with the clock at the moment each row is written (clock_timestamp(), not the
-- statement's or transaction's start), so a row written after its bucket ended always marks it. A row
-- written before its bucket ended belongs to a transaction that had an xid by then; the sealing
-- (perf_pipeline.lib.kpi_buckets.seal_buckets) looks only after the bucket has been over for a grace
-- period, and waits until every transaction that held an xid when it looked has finished.
--
-- Distinct users: usage_user_ordinals gives each user a small number; a bucket's user_bits has bit n
-- (leftmost = 0) set when the user of ordinal n has a row in the bucket. Its length is one more than the
-- largest ordinal when the bucket was computed; readers pad shorter bitmaps with zeros before OR-ing.
-- Ordinals are dense except after a sealing that rolled back (identity values are not transactional):
-- a gap only widens the bitmaps by one unused bit.
-- Only perf_pipeline.lib.kpi_buckets writes these tables; dashboard_kpis.sql reads them.

CREATE FUNCTION usage_kpi_bucket_width() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT interval '5 minutes' $$;
COMMENT ON FUNCTION usage_kpi_bucket_width() IS 'Width of a KPI bucket (usage_kpi_buckets).';

CREATE FUNCTION usage_kpi_bucket_horizon() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT interval '48 hours' $$;
COMMENT ON FUNCTION usage_kpi_bucket_horizon() IS
    'How far back from the current bucket late rows mark their bucket, hence how far back KPI buckets '
    'are trusted (one bucket less) and kept.';

-- the start of the bucket holding ts (UTC-aligned, whatever the session time zone)
CREATE FUNCTION usage_kpi_bucket_of(ts timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT date_bin(usage_kpi_bucket_width(), ts, '2000-01-01 00:00:00+00'::timestamptz)
$$;

-- [lo, hi) minus the sealed buckets, as ranges: what dashboard_kpis.sql reads from usage_log. A PL/pgSQL
-- function, never inlined, so that the planner uses its ROWS estimate (a few ranges) instead of
-- unnest()'s default of 100: that estimate, times a range scan each, priced the KPI statement above
-- jit_above_cost, and JIT compilation then took seconds for a query of milliseconds (EXPLAIN ANALYZE,
-- by hand, on a 500k-row test database).
CREATE FUNCTION usage_kpi_raw_ranges(lo timestamptz, hi timestamptz, sealed tstzmultirange)
RETURNS TABLE (range_lo timestamptz, range_hi timestamptz)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE ROWS 3 AS $$
BEGIN
    RETURN QUERY
    SELECT lower(r), upper(r)
    FROM unnest(tstzmultirange(tstzrange(lo, hi)) - coalesce(sealed, '{}'::tstzmultirange)) AS r;
END;
$$;

CREATE TABLE usage_user_ordinals (
    user_id uuid    PRIMARY KEY,
    ordinal integer NOT NULL UNIQUE GENERATED ALWAYS AS IDENTITY (MINVALUE 0 START WITH 0)
);
COMMENT ON TABLE usage_user_ordinals IS
    'A small number per user of usage_log, the bit position of the user in usage_kpi_buckets.user_bits.';

CREATE TABLE usage_kpi_buckets (
    bucket                 timestamptz PRIMARY KEY CHECK (bucket = usage_kpi_bucket_of(bucket)),
    transcriptions         bigint      NOT NULL CHECK (transcriptions >= 0),
    billable_cost_usd      numeric     NOT NULL CHECK (billable_cost_usd >= 0),
    duration_minutes_sum   numeric     NOT NULL CHECK (duration_minutes_sum >= 0),
    duration_minutes_count bigint      NOT NULL CHECK (duration_minutes_count >= 0),
    user_bits              varbit      NOT NULL,
    active_users           integer     NOT NULL CHECK (active_users = bit_count(user_bits)),
    computed_at            timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE usage_kpi_buckets IS
    'usage_log per closed 5-minute bucket of the last usage_kpi_bucket_horizon(), for the real-time KPIs.';

CREATE TABLE usage_kpi_stale_buckets (
    bucket    timestamptz PRIMARY KEY,
    marked_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE usage_kpi_stale_buckets IS
    'KPI buckets of usage_log changed after they ended (within the horizon); cleared by the sealing.';

CREATE FUNCTION usage_kpi_mark_stale_bucket(b timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    LOOP
        INSERT INTO usage_kpi_stale_buckets (bucket) VALUES (b) ON CONFLICT (bucket) DO NOTHING;
        EXIT WHEN FOUND;  -- our own uncommitted mark
        PERFORM 1 FROM usage_kpi_stale_buckets WHERE bucket = b FOR KEY SHARE;
        EXIT WHEN FOUND;  -- an existing mark, now locked until we commit
        -- the mark was deleted between the two statements (a sealing claimed it): insert again
    END LOOP;
    PERFORM set_config('perf_pipeline.stale_buckets_marked',
                       coalesce(current_setting('perf_pipeline.stale_buckets_marked', true), '')
                           || extract(epoch FROM b)::bigint || ',',
                       true);
END;
$$;

-- the bucket of ts if it lies in [current bucket - horizon, current bucket) at this very moment, else NULL
CREATE FUNCTION usage_kpi_closed_bucket(ts timestamptz) RETURNS timestamptz
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT CASE WHEN ts <  usage_kpi_bucket_of(clock_timestamp())
                 AND ts >= usage_kpi_bucket_of(clock_timestamp()) - usage_kpi_bucket_horizon()
                THEN usage_kpi_bucket_of(ts) END
$$;

CREATE FUNCTION usage_log_mark_stale_kpi_buckets() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    seen text := ',' || coalesce(current_setting('perf_pipeline.stale_buckets_marked', true), '');
    b    timestamptz;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        b := usage_kpi_closed_bucket(OLD.created_at);
        IF b IS NOT NULL AND position(',' || extract(epoch FROM b)::bigint || ',' IN seen) = 0 THEN
            PERFORM usage_kpi_mark_stale_bucket(b);
            seen := ',' || current_setting('perf_pipeline.stale_buckets_marked', true);
        END IF;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        b := usage_kpi_closed_bucket(NEW.created_at);
        IF b IS NOT NULL AND position(',' || extract(epoch FROM b)::bigint || ',' IN seen) = 0 THEN
            PERFORM usage_kpi_mark_stale_bucket(b);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

-- The WHEN clauses keep the normal write path free: a row stamped in the current bucket (or older than
-- the horizon) never calls the function. They spell the width and horizon out (5 minutes, 48 hours, as
-- usage_kpi_bucket_width() and usage_kpi_bucket_horizon()) so that no function is called per row; the
-- clock is read once per row (a vDSO call).
CREATE TRIGGER usage_log_late_insert_kpi_bucket
    AFTER INSERT ON usage_log FOR EACH ROW
    WHEN (NEW.created_at < date_bin('5 minutes', clock_timestamp(), '2000-01-01 00:00:00+00'::timestamptz)
          AND NEW.created_at >= date_bin('5 minutes', clock_timestamp(), '2000-01-01 00:00:00+00'::timestamptz)
                                - interval '48 hours')
    EXECUTE FUNCTION usage_log_mark_stale_kpi_buckets();

CREATE TRIGGER usage_log_late_update_kpi_bucket
    AFTER UPDATE ON usage_log FOR EACH ROW
    WHEN ((OLD.created_at < date_bin('5 minutes', clock_timestamp(), '2000-01-01 00:00:00+00'::timestamptz)
           AND OLD.created_at >= date_bin('5 minutes', clock_timestamp(), '2000-01-01 00:00:00+00'::timestamptz)
                                 - interval '48 hours')
          OR (NEW.created_at < date_bin('5 minutes', clock_timestamp(), '2000-01-01 00:00:00+00'::timestamptz)
              AND NEW.created_at >= date_bin('5 minutes', clock_timestamp(), '2000-01-01 00:00:00+00'::timestamptz)
                                    - interval '48 hours'))
    EXECUTE FUNCTION usage_log_mark_stale_kpi_buckets();

CREATE TRIGGER usage_log_late_delete_kpi_bucket
    AFTER DELETE ON usage_log FOR EACH ROW
    WHEN (OLD.created_at < date_bin('5 minutes', clock_timestamp(), '2000-01-01 00:00:00+00'::timestamptz)
          AND OLD.created_at >= date_bin('5 minutes', clock_timestamp(), '2000-01-01 00:00:00+00'::timestamptz)
                                - interval '48 hours')
    EXECUTE FUNCTION usage_log_mark_stale_kpi_buckets();

CREATE FUNCTION usage_log_mark_all_kpi_buckets() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_kpi_stale_buckets (bucket)
    SELECT bucket FROM usage_kpi_buckets
    ON CONFLICT (bucket) DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER usage_log_truncate_kpi_buckets
    AFTER TRUNCATE ON usage_log FOR EACH STATEMENT
    EXECUTE FUNCTION usage_log_mark_all_kpi_buckets();
