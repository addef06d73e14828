-- 0022_usage_daily_user_sets: distinct users per day as one sorted uuid[] per day, replacing
-- usage_daily_users (one row per day and user, from 0020).
--
-- Why: the row-per-(day, user) table made every rollup diff or rewrite ~2,000–5,000 index entries per
-- day (a 90-day backfill: ~200k–400k), which dominated the first backfill. One array per day is one
-- upserted row per day, skipped when unchanged; weekly/monthly exact distinct users unnest the arrays
-- of the period (read side cost unchanged: one element per user and day). Only the rollup writes and
-- only perf_pipeline.lib.rollups reads these tables.

DROP TABLE usage_daily_users;

CREATE TABLE usage_daily_user_sets (
    day      date   PRIMARY KEY,
    user_ids uuid[] NOT NULL    -- distinct users of the UTC day, sorted; '{}' on a day without usage
);
COMMENT ON TABLE usage_daily_user_sets IS
    'Distinct users per UTC day (sorted array): exact weekly/monthly active users = count(DISTINCT unnest).';
