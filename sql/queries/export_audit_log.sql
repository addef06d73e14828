-- export_audit_log: the rows of one audit_log export request (streamed by COPY (…) TO STDOUT).
--
-- Parameters are merged client-side by psycopg (ClientCursor.mogrify, proper literal quoting, after
-- validation), because COPY takes no server-side parameters. They are therefore constants at plan time:
-- the planner prunes every monthly partition outside [start, end), and folds the "IS NULL OR" of each
-- absent filter away. No ORDER BY: rows stream in partition (roughly time) order, so the export is a
-- plain sequential scan with no sort spilling to disk on the server.
SELECT id, "timestamp", user_id, entity_type, entity_id, event_type, operation, severity, description,
       details, ip
FROM audit_log
WHERE "timestamp" >= %(start)s::timestamptz
  AND "timestamp" < %(end)s::timestamptz
  AND (%(user_id)s::uuid IS NULL OR user_id = %(user_id)s::uuid)
  AND (%(entity_type)s::text IS NULL OR entity_type = %(entity_type)s::text)
  AND (%(severities)s::text[] IS NULL OR severity = ANY (%(severities)s::text[]))
