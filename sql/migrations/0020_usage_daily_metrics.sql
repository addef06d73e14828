-- 0020_usage_daily_metrics: the incremental daily usage rollup (issue 4) and the seed-compatible view.
--
-- One row per UTC day in usage_daily_metrics (written by the daily-partitioned Dagster asset
-- `usage_daily_metrics`, upserted per day, zeros for a rolled-up day without usage), one row per
-- (day, provider) present that day in usage_daily_provider_metrics, and the distinct users of each
-- day in usage_daily_users, so that weekly/monthly active users are computed exactly
-- (count(DISTINCT user_id) over the days of the period) instead of summing non-additive daily counts.
--
-- No CHECK (… >= 0) constraints on purpose: the asset check `usage_daily_metrics_non_negative`
-- reports bad numbers instead of the rollup failing half-way with a constraint error.

CREATE TABLE usage_daily_metrics (
    day           date        PRIMARY KEY,           -- UTC day: [day 00:00Z, day+1 00:00Z)
    sessions      bigint      NOT NULL,
    total_minutes numeric     NOT NULL,
    revenue       numeric     NOT NULL,              -- sum(cost_usd) of billable rows
    active_users  integer     NOT NULL,              -- exact count(DISTINCT user_id)
    avg_duration  numeric,                           -- avg(duration_minutes); NULL on a day without usage
    rows_scanned  bigint      NOT NULL,              -- usage_log rows read to compute the day
    computed_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE usage_daily_metrics IS
    'Daily usage rollup (Dagster asset usage_daily_metrics, one partition per UTC day).';

CREATE TABLE usage_daily_provider_metrics (
    day          date    NOT NULL,
    stt_provider text    NOT NULL,
    sessions     bigint  NOT NULL,
    minutes      numeric NOT NULL,
    revenue      numeric NOT NULL,
    PRIMARY KEY (day, stt_provider)
);
COMMENT ON TABLE usage_daily_provider_metrics IS
    'Per-provider daily usage: one row for every provider present that day (no fixed provider list).';

CREATE TABLE usage_daily_users (
    day     date NOT NULL,
    user_id uuid NOT NULL,
    PRIMARY KEY (day, user_id)
);
COMMENT ON TABLE usage_daily_users IS
    'Distinct users per UTC day: exact weekly/monthly active users are count(DISTINCT user_id) over it.';

-- The seed's materialized view, same name and columns, now a plain view over the rollup: reading it
-- costs at most 91 index-ordered rows, and it is never refreshed. As in the seed, it covers the days
-- from (UTC) today - 90 on, and a day without usage has no row.
CREATE VIEW dashboard_daily_metrics AS
SELECT m.day,
       m.sessions                   AS total_sessions,
       m.total_minutes,
       m.revenue,
       m.active_users::bigint       AS active_users,
       m.avg_duration,
       coalesce(g.sessions, 0)      AS google_sessions,
       coalesce(a.sessions, 0)      AS assemblyai_sessions
FROM usage_daily_metrics m
LEFT JOIN usage_daily_provider_metrics g ON g.day = m.day AND g.stt_provider = 'google'
LEFT JOIN usage_daily_provider_metrics a ON a.day = m.day AND a.stt_provider = 'assemblyai'
WHERE m.day >= (now() AT TIME ZONE 'UTC')::date - 90
  AND m.sessions > 0
ORDER BY m.day DESC;
