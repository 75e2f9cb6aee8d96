-- Every query flowkeeper sends, by name.  Loaded by flowkeeper/sql/__init__.py;
-- "{schema}" is replaced by the configured schema name.  Each block starts
-- with "-- name: <name>" and runs as one statement (one round trip, and when
-- outside a caller's transaction, one commit).

-- name: insert_run
-- Create a run.  With a positive $6 the run starts leased to the trigger's
-- own push (token $5); with $6 = 0 it is due at once for the scheduler.
INSERT INTO {schema}.runs (id, workflow, status, input, idempotency_key, lease_token, due_at)
VALUES ($1, $2, 'queued', $3::jsonb, $4, $5, {schema}.clock_now() + $6::interval)
ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id;

-- name: run_by_idempotency_key
SELECT id, status FROM {schema}.runs WHERE workflow = $1 AND idempotency_key = $2;

-- name: release_push
-- The trigger's push did not get through: make the run due now.
UPDATE {schema}.runs
SET lease_token = NULL, due_at = {schema}.clock_now(), updated_at = {schema}.clock_now()
WHERE id = $1 AND lease_token = $2;

-- name: claim_run
-- Take the lease for an invocation: allowed when the invocation carries the
-- token its dispatcher leased the run with, or when the run is due (queued,
-- sleep over, retry due, lease expired).  Returns the run and its recorded
-- history in the same round trip.
WITH claimed AS (
    UPDATE {schema}.runs
    SET status = 'running',
        lease_token = $3,
        due_at = {schema}.clock_now() + $4::interval,
        started_at = coalesce(started_at, {schema}.clock_now()),
        updated_at = {schema}.clock_now(),
        dispatch_failures = 0,
        invocations = invocations + 1
    WHERE id = $1
      AND status IN ('queued', 'running', 'sleeping', 'retrying')
      AND (lease_token = $2 OR due_at <= {schema}.clock_now())
    RETURNING id, workflow, input::text AS input, step_key, step_attempt, invocations
)
SELECT c.*,
       {schema}.clock_now() AS db_now,
       (SELECT json_agg(json_build_object(
                   'key', s.key, 'position', s.position, 'name', s.name,
                   'kind', s.kind, 'status', s.status,
                   'output', s.output::text, 'output_type', s.output_type,
                   'error', s.error, 'attempts', s.attempts, 'wake_at', s.wake_at)
                 ORDER BY s.position)
          FROM {schema}.steps s WHERE s.run_id = c.id)::text AS steps
FROM claimed c;

-- name: run_state
-- Why a claim was refused: the run's status and whether someone holds it.
SELECT status,
       (lease_token IS NOT NULL AND due_at > {schema}.clock_now()) AS leased,
       due_at,
       workflow
FROM {schema}.runs WHERE id = $1;

-- name: commit
-- The one write an invocation makes under its lease: new run state, the
-- step records it has not written yet, and events.  Refused (no row) when
-- the lease token is no longer current.  Due time: $6 (absolute), else
-- now + $5, else none (finished).
WITH r AS (
    UPDATE {schema}.runs
    SET status = $3,
        lease_token = $4,
        due_at = CASE WHEN $6::timestamptz IS NOT NULL THEN $6::timestamptz
                      WHEN $5::interval IS NOT NULL THEN {schema}.clock_now() + $5::interval
                 END,
        output = $7::jsonb,
        error = $8::jsonb,
        step_key = $9,
        step_attempt = $10,
        finished_at = CASE WHEN $3 IN ('completed', 'failed', 'cancelled')
                           THEN {schema}.clock_now() END,
        updated_at = {schema}.clock_now()
    WHERE id = $1 AND lease_token = $2
    RETURNING id, due_at
), s AS (
    INSERT INTO {schema}.steps (run_id, key, position, name, kind, status, input, output,
                                output_type, error, attempts, started_at, finished_at, wake_at)
    SELECT r.id, x.key, x.position, x.name, x.kind, x.status, x.input, x.output,
           x.output_type, x.error, x.attempts, x.started_at, x.finished_at,
           CASE WHEN x.kind = 'sleep' THEN coalesce(x.wake_at, r.due_at) END
    FROM r, jsonb_to_recordset($11::jsonb) AS x(
        key text, position integer, name text, kind text, status text, input jsonb,
        output jsonb, output_type text, error jsonb, attempts integer,
        started_at timestamptz, finished_at timestamptz, wake_at timestamptz)
), e AS (
    INSERT INTO {schema}.events (run_id, kind, step_key, attempt, detail)
    SELECT r.id, x.kind, x.step_key, x.attempt, x.detail
    FROM r, jsonb_to_recordset($12::jsonb) AS x(
        kind text, step_key text, attempt integer, detail jsonb)
)
SELECT id, due_at FROM r;

-- name: heartbeat
-- Keep the lease of a live invocation from expiring during a long step.
UPDATE {schema}.runs
SET due_at = {schema}.clock_now() + $3::interval
WHERE id = $1 AND lease_token = $2
RETURNING due_at;

-- name: cancel_run
WITH r AS (
    UPDATE {schema}.runs
    SET status = 'cancelled', lease_token = NULL, due_at = NULL,
        finished_at = {schema}.clock_now(), updated_at = {schema}.clock_now()
    WHERE id = $1 AND status IN ('queued', 'running', 'sleeping', 'retrying')
    RETURNING id
), e AS (
    INSERT INTO {schema}.events (run_id, kind, detail)
    SELECT r.id, 'cancelled', $2::jsonb FROM r
)
SELECT (SELECT count(*) FROM r) AS cancelled,
       (SELECT status FROM {schema}.runs WHERE id = $1) AS previous_status;

-- name: claim_due
-- The scheduler's claim: a batch of due runs, each leased to this tick for
-- $2 so no other tick dispatches it meanwhile.  SKIP LOCKED lets any number
-- of ticks run at once; the partial index keeps the cost O(due runs).
WITH due AS (
    SELECT id FROM {schema}.runs
    WHERE due_at <= {schema}.clock_now()
    ORDER BY due_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.runs r
SET lease_token = gen_random_uuid(),
    due_at = {schema}.clock_now() + $2::interval
FROM due
WHERE r.id = due.id
RETURNING r.id, r.lease_token, r.dispatch_failures;

-- name: run_status
SELECT status, output::text AS output, error::text AS error, workflow
FROM {schema}.runs WHERE id = $1;

-- name: get_run
SELECT id, workflow, status, input::text AS input, output::text AS output,
       error::text AS error, idempotency_key, due_at, step_key, step_attempt,
       dispatch_failures, invocations, created_at, updated_at, started_at, finished_at,
       (lease_token IS NOT NULL AND due_at > {schema}.clock_now()) AS leased
FROM {schema}.runs WHERE id = $1;

-- name: get_steps
SELECT key, position, name, kind, status, input::text AS input, output::text AS output,
       output_type, error::text AS error, attempts, started_at, finished_at, wake_at
FROM {schema}.steps WHERE run_id = $1 ORDER BY position;

-- name: get_events
SELECT id, at, kind, step_key, attempt, detail::text AS detail
FROM {schema}.events WHERE run_id = $1 ORDER BY id;

-- name: clock_now
SELECT {schema}.clock_now();

-- scheduler ---------------------------------------------------------------

-- name: dispatch_failed
-- Invocations that could not be delivered ($1 runs, $2 the tokens they were
-- claimed with): release the lease and make each due again after its backoff
-- ($3, seconds).  Visible as dispatch_failures, and as a 'dispatch_failed'
-- event ($4, the reason) on the 1st, 2nd, 4th, 8th... failure in a row, so an
-- endpoint that stays down for days adds a handful of events per run, not one
-- per attempt.
WITH failed AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::float8[], $4::text[])
        AS f(id, token, delay, reason)
), r AS (
    UPDATE {schema}.runs r
    SET lease_token = NULL,
        due_at = {schema}.clock_now() + make_interval(secs => f.delay),
        dispatch_failures = r.dispatch_failures + 1
    FROM failed f
    WHERE r.id = f.id AND r.lease_token = f.token
    RETURNING r.id, r.dispatch_failures, f.delay, f.reason
)
INSERT INTO {schema}.events (run_id, kind, detail)
SELECT id, 'dispatch_failed',
       jsonb_build_object('reason', reason, 'failures', dispatch_failures, 'retry_in', delay)
FROM r
WHERE dispatch_failures & (dispatch_failures - 1) = 0;

-- name: release_claims
-- Runs a tick claimed but did not send (it was stopped, or the endpoint kept
-- failing): due again at once instead of when the tick's lease runs out.
UPDATE {schema}.runs r
SET lease_token = NULL, due_at = {schema}.clock_now()
FROM unnest($1::uuid[], $2::uuid[]) AS c(id, token)
WHERE r.id = c.id AND r.lease_token = c.token;

-- name: next_due
-- When the next run needs attention (NULL when no run is live) and the
-- flowkeeper clock now, both as unix seconds.  min() over runs_due_idx reads
-- one index entry.
SELECT extract(epoch FROM min(due_at))::float8 AS due,
       extract(epoch FROM {schema}.clock_now())::float8 AS now
FROM {schema}.runs
WHERE due_at IS NOT NULL;
