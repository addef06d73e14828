-- rollup_period_user_sets: recompute the distinct users of the ISO weeks and months that the rollup
-- window [%(start_day)s, %(end_day)s) touches (usage_period_user_sets, migration 0070), run by
-- rollup_days after rollup_upsert in the same transaction.
--
-- A period is recomputed when it has a closed day (before today, UTC) and either one of its closed days
-- is in %(changed_days)s (the day sets rollup_upsert just rewrote), or its row is missing, or its
-- last_day is not the last closed day any more. So a refresh of today alone, or a re-run that changed
-- nothing, writes nothing. Cost per recomputed period: one array element per (user, day) of its
-- closed days (at most a month of usage_daily_user_sets). Locks: ROW EXCLUSIVE on
-- usage_period_user_sets; usage_daily_user_sets is only read.
WITH units(unit, step) AS (
    VALUES ('week', interval '1 week'), ('month', interval '1 month')
),
targets AS (
    SELECT p.unit, p.period,
           least((p.period + p.step)::date - 1, (now() AT TIME ZONE 'UTC')::date - 1) AS last_day
    FROM (
        SELECT DISTINCT u.unit, u.step, date_trunc(u.unit, d)::date AS period
        FROM units u
        CROSS JOIN generate_series(%(start_day)s::date::timestamp, %(end_day)s::date::timestamp - interval '1 day',
                                   interval '1 day') AS d
    ) AS p
),
todo AS (
    SELECT t.unit, t.period, t.last_day
    FROM targets t
    LEFT JOIN usage_period_user_sets s USING (unit, period)
    WHERE t.last_day >= t.period
      AND (s.period IS NULL
           OR s.last_day <> t.last_day
           OR EXISTS (SELECT 1 FROM unnest(%(changed_days)s::date[]) AS c(day)
                      WHERE c.day BETWEEN t.period AND t.last_day))
),
sets AS (
    SELECT t.unit, t.period, t.last_day,
           coalesce((SELECT array_agg(DISTINCT x.user_id ORDER BY x.user_id)
                     FROM usage_daily_user_sets s, unnest(s.user_ids) AS x(user_id)
                     WHERE s.day BETWEEN t.period AND t.last_day), '{}') AS user_ids
    FROM todo t
),
written AS (
    INSERT INTO usage_period_user_sets AS p (unit, period, last_day, user_ids, active_users, computed_at)
    SELECT unit, period, last_day, user_ids, cardinality(user_ids), clock_timestamp() FROM sets
    ON CONFLICT (unit, period) DO UPDATE SET
        last_day     = EXCLUDED.last_day,
        user_ids     = EXCLUDED.user_ids,
        active_users = EXCLUDED.active_users,
        computed_at  = EXCLUDED.computed_at
    RETURNING 1
)
SELECT count(*) AS period_sets_written FROM written;
