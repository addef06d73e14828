-- rollup_claim_marks: move the late-data marks of the days a rollup is about to recompute
-- ([%(start)s, %(end)s), minus the months in %(skip_months)s whose rows are not all in usage_log) into
-- usage_rollup_claims, in the caller's short transaction, committed before the rollup takes its snapshot.
-- The DELETE waits for late writers that hold one of these marks (FOR KEY SHARE, see 0021) to commit, so
-- every late row is either in the rollup's snapshot or marked again after this. Returns the claimed days.
WITH claimed AS (
    DELETE FROM usage_rollup_stale_days
    WHERE day >= %(start)s AND day < %(end)s
      AND date_trunc('month', day)::date <> ALL (%(skip_months)s::date[])
    RETURNING day, marked_at
)
INSERT INTO usage_rollup_claims (day, marked_at)
SELECT day, marked_at FROM claimed
RETURNING day
