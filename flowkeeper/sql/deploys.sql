-- Rolling deploys: runs whose workflow the invoked endpoint does not know
-- (an instance still on older code).  Loaded with queries.sql by
-- flowkeeper/sql/__init__.py; "{schema}" is replaced by the schema name.
--
-- Such a run is deferred, not failed: its lease is released and it is due
-- again after a backoff, its status left as it was.  The episode (since when
-- no endpoint knew the workflow, how many times) lives in 'workflow_unknown'
-- events: one is added on the 1st, 2nd, 4th, 8th... deferral of an episode,
-- and in between the latest one is brought up to date (its count, the next
-- try), so a week-long outage adds a handful of events per run, not one per
-- attempt.

-- name: unknown_workflow_episode
-- The flowkeeper clock now, and the run's latest 'workflow_unknown' event
-- (NULLs if none): where the current episode stands.
SELECT {schema}.clock_now() AS now, e.id AS event_id, e.detail::text AS detail
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT id, detail FROM {schema}.events
    WHERE run_id = $1 AND kind = 'workflow_unknown'
    ORDER BY id DESC
    LIMIT 1
) AS e ON true;

-- name: defer_unknown_workflow
-- Under the lease ($2): give the run back with status $3, due again in $4
-- seconds but no later than $7 (the end of the grace period), and record the
-- deferral ($5, the event's detail): a new event when $6 is NULL, else an
-- update of event $6 (the episode's latest).  The detail gets the due time
-- as 'retry_at'.  Refused (no row) when the lease was lost.
WITH r AS (
    UPDATE {schema}.runs
    SET status = $3,
        lease_token = NULL,
        executing = false,  -- nothing was executed: no attempt to count as lost
        due_at = least({schema}.clock_now() + make_interval(secs => $4::float8),
                       $7::timestamptz),
        updated_at = {schema}.clock_now()
    WHERE id = $1 AND lease_token = $2
      AND status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')
    RETURNING id, due_at
), added AS (
    INSERT INTO {schema}.events (run_id, kind, detail)
    SELECT r.id, 'workflow_unknown', $5::jsonb || jsonb_build_object('retry_at', r.due_at)
    FROM r
    WHERE $6::bigint IS NULL
), updated AS (
    UPDATE {schema}.events e
    SET detail = $5::jsonb || jsonb_build_object('retry_at', r.due_at)
    FROM r
    WHERE $6::bigint IS NOT NULL AND e.id = $6::bigint AND e.run_id = r.id
)
SELECT due_at FROM r;
