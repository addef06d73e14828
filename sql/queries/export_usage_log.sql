-- export_usage_log: the rows of one usage_log export request (streamed by COPY (…) TO STDOUT).
--
-- Parameters are merged client-side by psycopg (ClientCursor.mogrify, proper literal quoting, after
-- validation), because COPY takes no server-side parameters. They are therefore constants at plan time:
-- the planner prunes every monthly partition outside [start, end) and folds an absent user filter away.
-- No ORDER BY: rows stream in partition (roughly time) order, a plain sequential scan with no sort.
SELECT id, user_id, session_id, created_at, duration_minutes, cost_usd, is_billable, stt_provider
FROM usage_log
WHERE created_at >= %(start)s::timestamptz
  AND created_at < %(end)s::timestamptz
  AND (%(user_id)s::uuid IS NULL OR user_id = %(user_id)s::uuid)
