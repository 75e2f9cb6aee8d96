-- Driver health and the run backlog (flowkeeper.health).

-- name: driver_ticked
-- A driver of kind $1 at place $2 ticked: it claimed $3 runs, $4 dispatches failed.
INSERT INTO {schema}.driver_ticks AS d (kind, place, claimed, failed, last_error)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (kind, place) DO UPDATE
SET last_at = {schema}.clock_now(), ticks = d.ticks + 1, claimed = EXCLUDED.claimed,
    failed = EXCLUDED.failed, last_error = EXCLUDED.last_error;

-- name: driver_list
-- Every driver seen, most recent first, with its age in seconds (database clock).
SELECT kind, place, last_at, ticks, claimed, failed, last_error,
       extract(epoch FROM {schema}.clock_now() - last_at)::float8 AS age
FROM {schema}.driver_ticks ORDER BY last_at DESC LIMIT 50;

-- name: driver_prune
DELETE FROM {schema}.driver_ticks WHERE last_at < {schema}.clock_now() - interval '7 days';

-- name: backlog
-- Live runs that are due, those overdue by more than $1 seconds, and the
-- oldest due age; through runs_due_idx (due_at IS NOT NULL: the live runs).
SELECT count(*) FILTER (WHERE due_at <= {schema}.clock_now()) AS due,
       count(*) FILTER (WHERE due_at < {schema}.clock_now() - make_interval(secs => $1))
           AS overdue,
       extract(epoch FROM {schema}.clock_now() - min(due_at))::float8 AS oldest_age
FROM {schema}.runs WHERE due_at IS NOT NULL AND due_at <= {schema}.clock_now();

-- name: runs_by_status
SELECT status, count(*) AS n FROM {schema}.runs GROUP BY status;

-- name: run_trace_put
INSERT INTO {schema}.run_traces (run_id, carrier) VALUES ($1, $2::json)
ON CONFLICT (run_id) DO NOTHING;

-- name: run_trace_get
SELECT carrier::text FROM {schema}.run_traces WHERE run_id = $1;

-- name: pgcron_installed
SELECT to_regclass('{schema}.pgcron_settings') IS NOT NULL;

-- name: pgcron_last_tick
SELECT job_name, (last_tick->>'at')::timestamptz AS last_at,
       extract(epoch FROM {schema}.clock_now() - (last_tick->>'at')::timestamptz)::float8 AS age,
       (last_tick->>'claimed')::integer AS claimed, (last_tick->>'failed')::integer AS failed,
       last_tick->>'last_error' AS last_error
FROM {schema}.pgcron_settings WHERE last_tick IS NOT NULL LIMIT 1;

-- name: run_event_add
-- An observation recorded on a run's history outside its lease (a loop stall).
INSERT INTO {schema}.events (run_id, kind, step_key, attempt, detail)
VALUES ($1, $2, $3, $4, $5::jsonb);
