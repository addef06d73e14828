-- 0070_usage_period_user_sets: the distinct users of each ISO week and calendar month, kept by the
-- rollup, so weekly/monthly trends no longer union every day's user set of the range on a cache miss.
--
-- Why: reading weekly/monthly active users from usage_daily_user_sets costs one array element per
-- (user, day) of the range, which grows with the users per day: at 20M audit / 5M usage rows, the
-- 365-day monthly range took 114 ms against 18.8 ms at 1M (bench.scale). With this table a period's
-- closed days cost one row, whatever the users per day or the range length.
--
-- A row holds the users of the days [period, last_day] of its period, where last_day is the period's
-- last day or, for the period still running, the last day before "today" (UTC) at the time it was
-- computed. Days after last_day (today, and yesterday until its closing rollup) are read from
-- usage_daily_user_sets at query time. perf_pipeline.lib.rollups.rollup_days recomputes the rows of
-- the periods its window touches, in the same transaction, when one of the window's closed days
-- changed or last_day moved; a refresh of today alone never touches this table. Only the rollup writes
-- it and only perf_pipeline.lib.rollups reads it.

CREATE TABLE usage_period_user_sets (
    unit         text        NOT NULL CHECK (unit IN ('week', 'month')),
    period       date        NOT NULL,  -- first day: a Monday (ISO week) or a 1st (month)
    last_day     date        NOT NULL,
    user_ids     uuid[]      NOT NULL,  -- distinct users of [period, last_day], sorted
    active_users integer     NOT NULL,  -- cardinality(user_ids): read without de-TOASTing the array
    computed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (unit, period),
    CHECK (period = date_trunc(unit, period)::date),
    CHECK (last_day >= period AND last_day < (period + ('1 ' || unit)::interval)::date),
    CHECK (active_users = cardinality(user_ids))
);
COMMENT ON TABLE usage_period_user_sets IS
    'Distinct users per ISO week / month over [period, last_day] (closed days only), kept by the rollup.';

-- the periods of the days already rolled up (an upgrade of a database with history)
INSERT INTO usage_period_user_sets (unit, period, last_day, user_ids, active_users)
SELECT unit, period, last_day, user_ids, cardinality(user_ids)
FROM (
    SELECT u.unit,
           date_trunc(u.unit, s.day)::date AS period,
           max(s.day)                      AS last_day,
           coalesce(array_agg(DISTINCT x.user_id ORDER BY x.user_id) FILTER (WHERE x.user_id IS NOT NULL),
                    '{}')                  AS user_ids
    FROM (VALUES ('week'), ('month')) AS u(unit)
    CROSS JOIN usage_daily_user_sets s
    LEFT JOIN LATERAL unnest(s.user_ids) AS x(user_id) ON true
    WHERE s.day < (now() AT TIME ZONE 'UTC')::date
    GROUP BY 1, 2
) AS p;
