-- Every query flowkeeper sends, by name.  Loaded by flowkeeper/sql/__init__.py;
-- "{schema}" is replaced by the configured schema name.  Each block starts
-- with "-- name: <name>" and runs as one statement (one round trip, and when
-- outside a caller's transaction, one commit).

-- name: insert_run
-- Create a run.  With a positive $6 the run starts leased to the trigger's
-- own push (token $5); with $6 = 0 it is due at once for the scheduler.  A
-- conflict (the same run id already created by the endpoint, or the
-- idempotency key taken) inserts nothing: see run_by_id_or_key.  Flow
-- control (migration 0015): $7 the concurrency keys, $8 their limits, $9 the
-- priority, a head start of that many minutes in the due order; $10 its
-- timeout and $11 its start_timeout, from now (see runs_deadline_cap); $12
-- its rate keys and $13 their spacing.  $14: the workflow's code version.
INSERT INTO {schema}.runs (id, workflow, status, input, idempotency_key, lease_token, due_at,
                           flow_keys, flow_limits, priority, deadline, start_deadline,
                           rate_keys, rate_spacing, code_version)
VALUES ($1, $2, 'queued', $3::json, $4, $5,
        {schema}.clock_now() + $6::interval
            - CASE WHEN $6::interval > interval '0' THEN interval '0'
                   ELSE make_interval(mins => $9::integer) END,
        $7::text[], $8::integer[], $9::integer,
        {schema}.clock_now() + $10::interval, {schema}.clock_now() + $11::interval,
        $12::text[], $13::interval[], $14)
ON CONFLICT DO NOTHING
RETURNING id;

-- name: create_claimed_run
-- The endpoint creates a run handed to it by trigger() and takes its lease in
-- the same statement: one commit for "the run exists and is executing".  The
-- input is not sent back (the store has the text it sent): a statement that
-- writes keeps its whole answer before sending it, through a temporary file
-- past work_mem (migration 27).
INSERT INTO {schema}.runs (id, workflow, status, input, idempotency_key, lease_token, due_at,
                           started_at, invocations, executing, code_version)
VALUES ($1, $2, 'running', $3::json, $4, $5, {schema}.clock_now() + $6::interval,
        {schema}.clock_now(), 1, true, $7)
ON CONFLICT DO NOTHING
RETURNING id, workflow, step_key, step_attempt, invocations, lost_attempts, created_at,
          parent_id, {schema}.clock_now() AS db_now;

-- name: create_claimed_many
-- Several create_claimed_run writes as one statement (group commit,
-- flowkeeper.groupcommit): one array per create_claimed_run argument.  A row
-- that conflicts (its id or idempotency key taken, by an existing run or by an
-- earlier row of the same arrays: they are inserted in order) is not
-- inserted, as alone.  Returns the runs created (without their inputs, as
-- create_claimed_run).  Unnested in a select list, not FROM: each input goes
-- straight on to the insert, in order; in FROM every row would be collected
-- first (through a temporary file past work_mem, migration 26).
INSERT INTO {schema}.runs (id, workflow, status, input, idempotency_key, lease_token, due_at,
                           started_at, invocations, executing, code_version)
SELECT c.id, c.workflow, 'running', c.input, c.idempotency_key, c.lease_token,
       {schema}.clock_now() + c.lease, {schema}.clock_now(), 1, true, c.code_version
FROM (SELECT unnest($1::uuid[]) AS id, unnest($2::text[]) AS workflow,
             unnest($3::json[]) AS input, unnest($4::text[]) AS idempotency_key,
             unnest($5::uuid[]) AS lease_token, unnest($6::interval[]) AS lease,
             unnest($7::text[]) AS code_version) AS c
ON CONFLICT DO NOTHING
RETURNING id, workflow, idempotency_key, step_key, step_attempt, invocations, lost_attempts,
          created_at, parent_id, {schema}.clock_now() AS db_now;

-- name: create_gated_run
-- create_claimed_run for a flow-controlled run (migration 0018): insert_run's
-- arguments; outcome 'claimed' with the run, 'gated' (not claimed: see the
-- run) or 'conflict' (see run_by_id_or_key).  Without the input (migration 27).
SELECT * FROM {schema}.create_gated_lean($1, $2, $3::json, $4, $5, $6::interval, $7::text[],
                                    $8::integer[], $9::integer, $10::interval,
                                    $11::interval, $12::text[], $13::interval[], $14);

-- name: create_gated_many
-- Several create_gated_run writes as one statement (group commit): one array
-- per scalar argument ($1-$10: id, workflow, input, idempotency key, token,
-- lease, priority, timeout, start timeout, code version), the length of each
-- run's concurrency keys, limits, rate keys and spacings ($11-$14, NULL for
-- none), and those lists of all the runs one after the other ($15-$18).
-- Gated as a set when every key has room for all its runs, else run by run
-- (create_gated_batch, migration 0020); either way as one by one.  $19-$21:
-- the batch's flow_prelock, taken first, when this statement is the batch's
-- first (NULL: none).  Returns each write's position (from 1) and outcome
-- (without the input, migration 27).
SELECT * FROM {schema}.create_gated_batch_lean(
    $1::uuid[], $2::text[], $3::json[], $4::text[], $5::uuid[], $6::interval[],
    $7::integer[], $8::interval[], $9::interval[], $10::text[], $11::integer[],
    $12::integer[], $13::integer[], $14::integer[], $15::text[], $16::integer[],
    $17::text[], $18::interval[], $19::uuid[], $20::text[], $21::text[]);

-- name: run_by_id_or_key
-- After an insert that conflicted: the run with this id, else the run holding
-- the idempotency key.
SELECT id FROM {schema}.runs
WHERE id = $1 OR (workflow = $2 AND idempotency_key = $3)
ORDER BY (id = $1) DESC
LIMIT 1;

-- name: release_push
-- The trigger's push did not get through: make the run due now.
UPDATE {schema}.runs
SET lease_token = NULL, due_at = {schema}.clock_now() - make_interval(mins => priority),
    updated_at = {schema}.clock_now()
WHERE id = $1 AND lease_token = $2;

-- name: claim_run
-- Take the lease for an invocation: allowed when the invocation carries the
-- token its dispatcher leased the run with, or when the run is due (queued,
-- sleep over, retry due, lease expired).  Returns the run and its recorded
-- history in the same round trip.  A run still marked executing was held by
-- an invocation that died inside a step: one more lost attempt (see
-- migration 0005).  A finished run whose stopping invocation died is let go.
-- Flow control first (migration 0009): a run over a concurrency limit is
-- parked by flow_gate, a run past a deadline is failed, and nothing is claimed.
-- $5: how far ahead a late rate-limited run may take a new start time, for
-- this invocation to wait for (migration 0025).  $6, $7: the most bytes of
-- step values (as stored) and steps a history may hold to come back with the
-- claim, as JSON; a larger one comes back as NULL (history_apart) and the
-- store reads it with claim_history.  Its rows cost less than the JSON past a
-- few dozen steps, and this statement updates the run, so Postgres keeps its
-- whole result before sending it (in a temporary file past work_mem, refused
-- where temp_file_limit is low), where a plain SELECT sends rows as it makes
-- them.  The stored size is read without decompressing a value; lz4 and
-- pglz shrink a value at most about 255 times, so a history under
-- work_mem / 1024 stored is under a quarter of work_mem uncompressed (half,
-- escaped into JSON).  The run's input likewise: inline when its stored size
-- is within the same budget, else NULL (input_apart) and read by claim_input.
WITH gate AS (
    SELECT coalesce(bool_and({schema}.flow_gate_within($1, $2, $5::interval)), true) AS ok
    FROM {schema}.runs
    WHERE id = $1
      AND (flow_keys IS NOT NULL OR rate_keys IS NOT NULL OR deadline IS NOT NULL
           OR start_deadline IS NOT NULL)
), claimed AS (
    UPDATE {schema}.runs
    SET status = 'running',
        lease_token = $3,
        due_at = {schema}.clock_now() + $4::interval,
        started_at = coalesce(started_at, {schema}.clock_now()),
        updated_at = {schema}.clock_now(),
        dispatch_failures = 0,
        invocations = invocations + 1,
        lost_attempts = lost_attempts + CASE WHEN executing THEN 1 ELSE 0 END,
        executing = true
    WHERE id = $1
      AND status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')
      AND (lease_token = $2 OR due_at <= {schema}.clock_now())
      AND (SELECT ok FROM gate)
    RETURNING id, workflow,
              -- A large input is left out, as a large history (claim_input).
              CASE WHEN coalesce(pg_column_size(input), 0)
                        <= least($6::bigint, pg_size_bytes(current_setting('work_mem')) / 1024)
                   THEN input::text END AS input,
              coalesce(pg_column_size(input), 0)
                  > least($6::bigint, pg_size_bytes(current_setting('work_mem')) / 1024)
                  AS input_apart,
              step_key, step_attempt, invocations, lost_attempts, created_at, parent_id
), stale AS (
    UPDATE {schema}.runs
    SET lease_token = NULL, due_at = NULL, executing = false
    WHERE id = $1
      AND status IN ('completed', 'failed', 'cancelled')
      -- IS TRUE: no index but the primary key can serve this lookup.  Over a
      -- large history the statistics say no row has a due time, and the
      -- planner scanned all of runs_due_idx (every live run) instead.
      AND (due_at IS NOT NULL) IS TRUE
      AND (lease_token = $2 OR due_at <= {schema}.clock_now())
)
-- A small history in no order (the store sorts it by position): an ordered
-- aggregate sorts what it is given, a copy of every step built into JSON.
SELECT c.*,
       {schema}.clock_now() AS db_now,
       h.apart AS history_apart,
       CASE WHEN NOT h.apart THEN
           (SELECT json_agg(json_build_object(
                       'key', s.key, 'position', s.position, 'name', s.name,
                       'kind', s.kind, 'status', s.status,
                       'output', s.output::text, 'output_type', s.output_type,
                       'error', s.error, 'attempts', s.attempts, 'wake_at', s.wake_at))
              FROM {schema}.steps s WHERE s.run_id = c.id)::text
       END AS steps
FROM claimed c,
     LATERAL (SELECT count(*) > $7::integer
                     OR coalesce(sum(coalesce(pg_column_size(s.output), 0)
                                     + coalesce(pg_column_size(s.error), 0)), 0)
                        > least($6::bigint, pg_size_bytes(current_setting('work_mem')) / 1024)
                     AS apart
              FROM {schema}.steps s WHERE s.run_id = c.id) AS h;

-- name: claim_input
-- A claimed run's input when claim_run left it out for its size, sent as it
-- is made (a plain SELECT).
SELECT input::text AS input FROM {schema}.runs WHERE id = $1;

-- name: claim_history
-- A claimed run's history when claim_run left it out for its size: one row
-- per step, sent as Postgres makes them.  The output goes as it is stored (a
-- large value is a pointer until it is sent, so the sort moves pointers);
-- a cast to text would decompress every value first.
SELECT key, position, name, kind, status, output, output_type,
       error::text AS error, attempts, wake_at
FROM {schema}.steps WHERE run_id = $1 ORDER BY position;

-- name: run_state
-- Why a claim was refused: the run's status and whether someone holds it;
-- for a run throttled by a rate limit, not started yet, whether its time was
-- exchanged after a late wake, and the database clock.
SELECT status,
       (lease_token IS NOT NULL AND due_at > {schema}.clock_now()) AS leased,
       due_at,
       workflow,
       blocked_key,
       (throttled_until IS NOT NULL AND started_at IS NULL) AS throttled,
       coalesce(rate_exchanged, false) AS rate_exchanged,
       {schema}.clock_now() AS now
FROM {schema}.runs WHERE id = $1;

-- name: commit
-- The one write an invocation makes under its lease: new run state, the
-- step records it has not written yet ($11-$23, one array per column; $29:
-- how many chunks of each one's output were staged ahead, 0 if none), and
-- events ($24-$27).  Refused (no row) when the lease token is no longer
-- current, the run was cancelled meanwhile (fencing) or its run timeout has
-- passed (flowkeeper.flowcontrol).  Due time: unchanged
-- when $28 (a mid-run flush: no indexed column changes, so the update can be
-- HOT and the lease is kept alive by the heartbeat; the invocation goes on
-- executing), else $6 (absolute), else now + $5, else none (finished).  Lost
-- attempts are settled by every write: the engine has charged them to their
-- step ($9/$10) by then.
WITH r AS (
    UPDATE {schema}.runs
    SET status = $3,
        lease_token = $4,
        due_at = CASE WHEN $28::boolean THEN due_at
                      WHEN $6::timestamptz IS NOT NULL THEN $6::timestamptz
                      WHEN $5::interval IS NOT NULL THEN {schema}.clock_now() + $5::interval
                 END,
        output = $7::json,
        error = $8::jsonb,
        step_key = $9,
        step_attempt = $10,
        executing = $28::boolean,
        lost_attempts = 0,
        finished_at = CASE WHEN $3 IN ('completed', 'failed', 'cancelled')
                           THEN {schema}.clock_now() END,
        updated_at = {schema}.clock_now()
    WHERE id = $1 AND lease_token = $2
      AND status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')
      -- Past its run timeout nothing more is recorded: the next claim fails it.
      AND NOT coalesce(deadline <= {schema}.clock_now(), false)
    RETURNING id, due_at
), s AS (
    INSERT INTO {schema}.steps (run_id, key, position, name, kind, status, input, output,
                                output_type, error, attempts, started_at, finished_at, wake_at)
    SELECT r.id, x.key, x.position, x.name, x.kind, x.status, x.input, o.output,
           x.output_type, x.error, x.attempts, x.started_at, x.finished_at,
           CASE WHEN x.kind = 'sleep' THEN coalesce(x.wake_at, r.due_at) ELSE x.wake_at END
    -- Unnested in a select list, as in commit_lean (below): no copy of the values.
    FROM r, (SELECT unnest($11::text[]) AS key, unnest($12::integer[]) AS position,
                    unnest($13::text[]) AS name, unnest($14::text[]) AS kind,
                    unnest($15::text[]) AS status, unnest($16::json[]) AS input,
                    unnest($17::json[]) AS output_text, unnest($18::text[]) AS output_type,
                    unnest($19::jsonb[]) AS error, unnest($20::integer[]) AS attempts,
                    unnest($21::timestamptz[]) AS started_at,
                    unnest($22::timestamptz[]) AS finished_at,
                    unnest($23::timestamptz[]) AS wake_at,
                    unnest($29::integer[]) AS staged) AS x,
         -- A large output was sent ahead in chunks (stage_chunk): put together here.
         LATERAL (SELECT CASE WHEN x.staged > 0
                              THEN {schema}.staged_output(r.id, x.key, $2, x.staged)
                              ELSE x.output_text END AS output) AS o
    -- A parallel branch's retry state (status 'retrying', migration 0009) is
    -- replaced by the step's next record; nothing else is ever overwritten.
    ON CONFLICT (run_id, key) DO UPDATE
    SET status = EXCLUDED.status, input = EXCLUDED.input, output = EXCLUDED.output,
        output_type = EXCLUDED.output_type, error = EXCLUDED.error,
        attempts = EXCLUDED.attempts, finished_at = EXCLUDED.finished_at,
        wake_at = EXCLUDED.wake_at
    WHERE {schema}.steps.status = 'retrying'
), e AS (
    INSERT INTO {schema}.events (run_id, kind, step_key, attempt, detail)
    SELECT r.id, x.kind, x.step_key, x.attempt, x.detail
    FROM r, unnest($24::text[], $25::text[], $26::integer[], $27::jsonb[])
         AS x(kind, step_key, attempt, detail)
)
SELECT id, due_at FROM r;

-- name: commit_lean
-- commit (above) when there are no events to write and no output was staged
-- ahead, the common case: no empty events insert, no per-step look at staged
-- chunks, five parameters fewer.  Fencing, due time and the step insert are
-- commit's, word for word (tests/unit/test_commit_sql.py holds them equal).
WITH r AS (
    UPDATE {schema}.runs
    SET status = $3,
        lease_token = $4,
        due_at = CASE WHEN $24::boolean THEN due_at
                      WHEN $6::timestamptz IS NOT NULL THEN $6::timestamptz
                      WHEN $5::interval IS NOT NULL THEN {schema}.clock_now() + $5::interval
                 END,
        output = $7::json,
        error = $8::jsonb,
        step_key = $9,
        step_attempt = $10,
        executing = $24::boolean,
        lost_attempts = 0,
        finished_at = CASE WHEN $3 IN ('completed', 'failed', 'cancelled')
                           THEN {schema}.clock_now() END,
        updated_at = {schema}.clock_now()
    WHERE id = $1 AND lease_token = $2
      AND status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')
      -- Past its run timeout nothing more is recorded: the next claim fails it.
      AND NOT coalesce(deadline <= {schema}.clock_now(), false)
    RETURNING id, due_at
), s AS (
    INSERT INTO {schema}.steps (run_id, key, position, name, kind, status, input, output,
                                output_type, error, attempts, started_at, finished_at, wake_at)
    SELECT r.id, x.key, x.position, x.name, x.kind, x.status, x.input, x.output,
           x.output_type, x.error, x.attempts, x.started_at, x.finished_at,
           CASE WHEN x.kind = 'sleep' THEN coalesce(x.wake_at, r.due_at) ELSE x.wake_at END
    -- The arrays are unnested in a select list, not FROM: a set-returning
    -- function in FROM has its rows collected first (in a temporary file past
    -- work_mem), a copy of every value; here each row goes straight on.
    FROM r, (SELECT unnest($11::text[]) AS key, unnest($12::integer[]) AS position,
                    unnest($13::text[]) AS name, unnest($14::text[]) AS kind,
                    unnest($15::text[]) AS status, unnest($16::json[]) AS input,
                    unnest($17::json[]) AS output, unnest($18::text[]) AS output_type,
                    unnest($19::jsonb[]) AS error, unnest($20::integer[]) AS attempts,
                    unnest($21::timestamptz[]) AS started_at,
                    unnest($22::timestamptz[]) AS finished_at,
                    unnest($23::timestamptz[]) AS wake_at) AS x
    -- A parallel branch's retry state (status 'retrying', migration 0009) is
    -- replaced by the step's next record; nothing else is ever overwritten.
    ON CONFLICT (run_id, key) DO UPDATE
    SET status = EXCLUDED.status, input = EXCLUDED.input, output = EXCLUDED.output,
        output_type = EXCLUDED.output_type, error = EXCLUDED.error,
        attempts = EXCLUDED.attempts, finished_at = EXCLUDED.finished_at,
        wake_at = EXCLUDED.wake_at
    WHERE {schema}.steps.status = 'retrying'
)
SELECT id, due_at FROM r;

-- name: commit_lean_many
-- Several commit_lean writes of different runs, as one statement (group
-- commit, flowkeeper.groupcommit): one array per column of the runs ($1-$11,
-- in the order of commit_lean's $1-$10 and $24) and of their steps ($12-$25,
-- $12 the position of each step's write in the runs' arrays, from 1).  Each
-- run is fenced on its own, as commit_lean fences it; a run whose write is
-- refused writes no steps.  $26-$28: the batch's flow_prelock (migration
-- 0019), taken before any row is written, when this statement is the batch's
-- first (NULL: none); one round trip instead of a statement of its own.
-- Returns the position, id and due time of each write that took.  The
-- statement is a function (migration 0022) so that its plan reads runs by
-- primary key however small runs was when the plan was made.
SELECT ord, id, due_at
FROM {schema}.commit_lean_many(
    $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
    $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28);

-- name: heartbeat
-- Keep the lease of a live invocation from expiring during a long step.  The
-- status tells the invocation when the run was cancelled under it: the lease
-- is kept until its step has really stopped (see cancel_run).
UPDATE {schema}.runs
SET due_at = {schema}.clock_now() + $3::interval
WHERE id = $1 AND lease_token = $2
  AND NOT coalesce(deadline <= {schema}.clock_now(), false)  -- timed out: the step stops
RETURNING status;

-- name: release_stopped
-- The invocation of a run cancelled under it has stopped its step: let go of
-- the run, so it can be replayed, and record how it stopped ($3).
WITH r AS (
    UPDATE {schema}.runs
    SET lease_token = NULL, due_at = NULL, executing = false, updated_at = {schema}.clock_now()
    WHERE id = $1 AND lease_token = $2 AND status = 'cancelled'
    RETURNING id
), e AS (
    INSERT INTO {schema}.events (run_id, kind, detail)
    SELECT r.id, 'stopped', $3::jsonb FROM r
)
SELECT id FROM r;

-- name: cancel_run
-- Cancel a live run.  An invocation executing it right now keeps its lease
-- (and its heartbeat keeps it alive) until it has stopped its step, then lets
-- go (release_stopped); meanwhile none of its writes is accepted, and replay
-- is refused, so no step ever runs twice at once.  Any other lease (a
-- dispatch in flight) is dropped.
WITH r AS (
    UPDATE {schema}.runs
    SET status = 'cancelled',
        lease_token = CASE WHEN executing AND due_at > {schema}.clock_now()
                           THEN lease_token END,
        due_at = CASE WHEN executing AND due_at > {schema}.clock_now() THEN due_at END,
        finished_at = {schema}.clock_now(), updated_at = {schema}.clock_now()
    WHERE id = $1 AND status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')
    RETURNING id, lease_token IS NOT NULL AS stopping
), e AS (
    INSERT INTO {schema}.events (run_id, kind, detail)
    SELECT r.id, 'cancelled',
           CASE WHEN r.stopping THEN $2::jsonb || '{"stopping": true}' ELSE $2::jsonb END
    FROM r
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
       (lease_token IS NOT NULL AND due_at > {schema}.clock_now()) AS leased, code_version
FROM {schema}.runs WHERE id = $1;

-- name: get_steps
-- input and output as stored (json comes back as its text): a cast to text
-- would decompress every value before the sort, through a temporary file
-- past work_mem (see claim_history).
SELECT key, position, name, kind, status, input, output,
       output_type, error::text AS error, attempts, started_at, finished_at, wake_at
FROM {schema}.steps WHERE run_id = $1 ORDER BY position;

-- name: get_events
SELECT id, at, kind, step_key, attempt, detail::text AS detail
FROM {schema}.events WHERE run_id = $1 ORDER BY id;

-- name: clock_now
SELECT {schema}.clock_now();

-- dashboard ------------------------------------------------------------------
-- The runs list, replay and retry, failure alerts and login throttling.  Run
-- ids are UUIDv7: "newest first" is id descending and a time range is an id
-- range [$1, $2).  Each list variant is a plain statement (no "$n IS NULL OR"
-- switches) so a cached generic plan still uses the right index.

-- name: list_run_ids
SELECT id FROM {schema}.runs
WHERE id >= $1 AND id < $2
ORDER BY id DESC LIMIT $3;

-- name: list_run_ids_by_status
SELECT id FROM {schema}.runs
WHERE id >= $1 AND id < $2 AND status = $4
ORDER BY id DESC LIMIT $3;

-- name: list_run_ids_by_workflow
SELECT id FROM {schema}.runs
WHERE id >= $1 AND id < $2 AND workflow = $4
ORDER BY id DESC LIMIT $3;

-- name: list_run_ids_by_workflow_status
SELECT id FROM {schema}.runs
WHERE id >= $1 AND id < $2 AND workflow = $4 AND status = $5
ORDER BY id DESC LIMIT $3;

-- name: search_run_ids
-- An exact run id ($4), or an exact idempotency key ($5) in any workflow.
SELECT id FROM {schema}.runs
WHERE id >= $1 AND id < $2 AND (id = $4 OR idempotency_key = $5)
ORDER BY id DESC LIMIT $3;

-- name: run_summaries
SELECT r.id, r.workflow, r.status, r.idempotency_key, r.created_at, r.updated_at,
       r.started_at, r.finished_at, r.due_at, r.step_key, r.step_attempt, r.invocations,
       r.error->>'type' AS error_type, left(r.error->>'message', 500) AS error_message,
       r.error->>'step' AS error_step,
       (SELECT count(*) FROM {schema}.steps s WHERE s.run_id = r.id) AS steps
FROM {schema}.runs r WHERE r.id = ANY($1::uuid[])
ORDER BY r.id DESC;

-- name: count_runs_by_status
SELECT status, count(*) AS n FROM {schema}.runs
WHERE id >= $1 AND id < $2
GROUP BY status;

-- name: count_workflow_runs_by_status
SELECT status, count(*) AS n FROM {schema}.runs
WHERE id >= $1 AND id < $2 AND workflow = $3
GROUP BY status;

-- name: list_workflows
-- Distinct workflow names by skipping through runs_workflow_idx: one index
-- probe per name, not a scan of every run.
WITH RECURSIVE w AS (
    (SELECT workflow FROM {schema}.runs ORDER BY workflow LIMIT 1)
    UNION ALL
    SELECT (SELECT r.workflow FROM {schema}.runs r
            WHERE r.workflow > w.workflow ORDER BY r.workflow LIMIT 1)
    FROM w WHERE w.workflow IS NOT NULL
)
SELECT workflow FROM w WHERE workflow IS NOT NULL;

-- name: run_version
-- What a live view polls: it refetches the run only when this changes.
SELECT r.status, r.updated_at,
       (SELECT max(e.id) FROM {schema}.events e WHERE e.run_id = r.id) AS last_event
FROM {schema}.runs r WHERE r.id = $1;

-- name: replay_run
-- Run a finished run again from step position $2: the step records at and
-- after it are deleted (earlier results kept), retry state is reset, and the
-- run is queued, leased to the caller's push ($4 for $5) or due at once.
-- Refused (replayed = 0) unless the run is finished and no invocation still
-- holds it (one cancelled while executing a step, not yet stopped).  $3 is
-- the event kind, $6 its detail, $7 its step.
WITH r AS (
    UPDATE {schema}.runs
    SET status = 'queued', output = NULL, error = NULL, step_key = NULL, step_attempt = 0,
        lease_token = $4, due_at = {schema}.clock_now() + $5::interval,
        finished_at = NULL, dispatch_failures = 0, updated_at = {schema}.clock_now(),
        executing = false, lost_attempts = 0
    WHERE id = $1 AND status IN ('completed', 'failed', 'cancelled')
      AND NOT (lease_token IS NOT NULL AND due_at > {schema}.clock_now())
    RETURNING id
), d AS (
    DELETE FROM {schema}.steps s USING r
    WHERE s.run_id = r.id AND s.position >= $2
    RETURNING s.key, s.position
), w AS (
    -- The waits among the forgotten steps are forgotten with them (they will be
    -- registered again, and may look back to the same event); cancel_on rules
    -- are armed again for the replayed run.
    DELETE FROM {schema}.waits x USING d, r
    WHERE x.run_id = r.id AND x.key = d.key
), c AS (
    UPDATE {schema}.waits x SET resolved_at = NULL, resolved_event = NULL, outcome = NULL
    FROM r WHERE x.run_id = r.id AND x.kind = 'cancel'
), k AS (
    -- The children started by forgotten steps are detached (renamed, kept
    -- linked): the replay starts new ones, as it re-runs any forgotten step.
    UPDATE {schema}.runs ch
    SET parent_step = ch.parent_step || '~replaced@' || {schema}.clock_now()::text,
        awaited_by = NULL
    FROM d, r WHERE ch.parent_id = r.id AND ch.parent_step = d.key
), cw AS (
    DELETE FROM {schema}.child_waits x USING d, r
    WHERE x.parent_id = r.id AND x.key = d.key
), e AS (
    INSERT INTO {schema}.events (run_id, kind, step_key, detail)
    SELECT r.id, $3, $7,
           $6::jsonb || jsonb_build_object(
               'forgotten', (SELECT coalesce(jsonb_agg(d.key ORDER BY d.position), '[]')
                             FROM d))
    FROM r
)
SELECT (SELECT count(*) FROM r) AS replayed, (SELECT count(*) FROM d) AS forgotten;

-- name: retry_now
-- A run waiting for a step's retry: make the retry due now (leased to the
-- caller's push $2 for $3, or due at once) and record it ($4 detail).
WITH r AS (
    UPDATE {schema}.runs
    SET lease_token = $2, due_at = {schema}.clock_now() + $3::interval,
        updated_at = {schema}.clock_now()
    WHERE id = $1 AND status = 'retrying' AND lease_token IS NULL
    RETURNING id, step_key, step_attempt
), e AS (
    INSERT INTO {schema}.events (run_id, kind, step_key, attempt, detail)
    SELECT r.id, 'retried', r.step_key, r.step_attempt + 1, $4::jsonb FROM r
)
SELECT count(*) AS retried FROM r;

-- name: failed_run_ids
SELECT id FROM {schema}.runs
WHERE workflow = $1 AND status = 'failed' AND id >= $2 AND id < $3
ORDER BY id LIMIT $4;

-- name: claim_alerts
-- Due failure alerts (only run $3's when given), each leased to this caller
-- for $2 so no one else delivers it meanwhile; with what the alert says.
WITH due AS (
    SELECT id FROM {schema}.alerts
    WHERE due_at <= {schema}.clock_now() AND ($3::uuid IS NULL OR run_id = $3::uuid)
    ORDER BY due_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.alerts a
SET due_at = {schema}.clock_now() + $2::interval, attempts = a.attempts + 1
FROM due, {schema}.runs r
WHERE a.id = due.id AND r.id = a.run_id
RETURNING a.id, a.run_id, a.attempts, a.done, a.created_at, r.workflow, r.status,
          r.error::text AS error, r.input::text AS input, r.idempotency_key,
          r.started_at, r.finished_at;

-- name: alert_result
-- After a delivery attempt: the destinations done ($2); settled as $3
-- ('delivered' | 'abandoned') or due again in $4; an event on the run's
-- history ($6 kind, $7 detail) when $6 is set.
WITH a AS (
    UPDATE {schema}.alerts
    SET done = $2, outcome = $3, last_error = $5,
        settled_at = CASE WHEN $3::text IS NOT NULL THEN {schema}.clock_now() END,
        due_at = CASE WHEN $3::text IS NULL THEN {schema}.clock_now() + $4::interval END
    WHERE id = $1
    RETURNING run_id
)
INSERT INTO {schema}.events (run_id, kind, detail)
SELECT a.run_id, $6, $7::jsonb FROM a WHERE $6::text IS NOT NULL;

-- name: login_failures
-- Sign-in attempts of client $1 within the window $2 since its last successful
-- sign-in (counted by login_attempt).
SELECT failures FROM {schema}.login_failures
WHERE client = $1 AND window_start > {schema}.clock_now() - $2::interval;

-- name: login_succeeded
DELETE FROM {schema}.login_failures WHERE client = $1;

-- name: login_attempt
-- Count a sign-in attempt of client $1 before its password is looked at and
-- return the attempts within the window $2, this one included.  One atomic
-- statement (the upsert locks the client's row), so guesses sent at once are
-- counted one after another and none is evaluated past the limit.  A
-- successful sign-in deletes the row (login_succeeded).
WITH gc AS (
    DELETE FROM {schema}.login_failures
    WHERE client <> $1 AND window_start < {schema}.clock_now() - $2::interval
)
INSERT INTO {schema}.login_failures AS f (client, failures, window_start)
VALUES ($1, 1, {schema}.clock_now())
ON CONFLICT (client) DO UPDATE
SET failures = CASE WHEN f.window_start > {schema}.clock_now() - $2::interval
                    THEN f.failures + 1 ELSE 1 END,
    window_start = CASE WHEN f.window_start > {schema}.clock_now() - $2::interval
                        THEN f.window_start ELSE {schema}.clock_now() END
RETURNING failures;

-- name: session_start
-- A dashboard session ($1 the SHA-256 of its id) valid for $2; expired
-- sessions are swept at the same time.
WITH gc AS (
    DELETE FROM {schema}.dashboard_sessions WHERE expires_at <= {schema}.clock_now()
)
INSERT INTO {schema}.dashboard_sessions (id, expires_at)
VALUES ($1, {schema}.clock_now() + $2::interval);

-- name: session_valid
SELECT EXISTS (
    SELECT 1 FROM {schema}.dashboard_sessions
    WHERE id = $1 AND expires_at > {schema}.clock_now()
);

-- name: session_end
DELETE FROM {schema}.dashboard_sessions WHERE id = $1;

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
-- one index entry; a cron schedule's next slot counts as due too (its tick
-- creates the run), read from schedules_due_idx.
SELECT extract(epoch FROM least(
           (SELECT min(due_at) FROM {schema}.runs WHERE due_at IS NOT NULL),
           (SELECT min(next_at) FROM {schema}.schedules
            WHERE next_at IS NOT NULL AND NOT paused AND removed_at IS NULL)))::float8 AS due,
       extract(epoch FROM {schema}.clock_now())::float8 AS now;

-- name: stage_chunk
-- One piece of a large step output, sent ahead of the commit that records the
-- step (so that no single message holds the whole value in memory).
INSERT INTO {schema}.step_chunks (run_id, key, token, seq, chunk)
VALUES ($1, $2, $3, $4, $5);

-- name: clear_staged
-- After the commit that used them (or could not): a run's staged chunks.
DELETE FROM {schema}.step_chunks WHERE run_id = $1;

-- name: run_ids_like
-- The runs whose id lies in [$1, $2] (a prefix's range, so the primary key
-- index narrows it) and matches the LIKE pattern $3 (prefix…suffix as the
-- dashboard shows it).  Three at most: one is a match, two say "ambiguous".
SELECT id FROM {schema}.runs
WHERE id BETWEEN $1 AND $2 AND id::text LIKE $3
ORDER BY id
LIMIT 3;

-- name: run_input_text
-- A run's input as the exact text stored (an idempotency-key hit compares it).
SELECT input::text AS input FROM {schema}.runs WHERE id = $1;

-- name: flow_prelock
-- A group commit batch of several flow-controlled writes takes their rows and
-- keys first, in order (migration 0019): $1 the runs it writes, $2 the
-- concurrency keys and $3 the rate keys of the runs it creates.
SELECT {schema}.flow_prelock($1::uuid[], $2::text[], $3::text[]);
