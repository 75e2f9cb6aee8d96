-- flowkeeper schema, version 26: a batch's step values go from the statement's
-- parameters into their rows without being collected on the way.
--
-- commit_lean_many (version 22) read its steps from unnest(...) in FROM.  A
-- set-returning function in FROM has all its rows collected before the first
-- is used: in memory up to work_mem (4 MB by default), past it in a temporary
-- file, written and read back.  A batch holding more than work_mem of step
-- results (group commit merges up to 16 MB) was copied once more, through the
-- disk, and failed on a server that limits temporary files (temp_file_limit):
-- the step could not be recorded.  The arrays are now unnested in a select
-- list, where each row goes straight on to the insert, and a step finds its
-- run's write through the positions of the writes that took (ANY, evaluated
-- once) instead of a join, so the values are read once and never collected.
-- tests/integration/test_payload_storage.py records such a batch on a
-- database with temp_file_limit = 0 and work_mem = 1MB.  Batches under
-- work_mem cost the same as before (the payload benchmark's, side by side:
-- 500 KB and 2 MB results at the same throughput).  The same signature and
-- results: a library at version 25 can use this schema.
--
-- CREATE OR REPLACE FUNCTION drops function settings: this one says
-- SET enable_seqscan = off again (version 22; tests/integration/test_hot_plans.py).
CREATE OR REPLACE FUNCTION {schema}.commit_lean_many(uuid[], uuid[], text[], uuid[], interval[], timestamptz[], json[], jsonb[], text[], integer[], boolean[], bigint[], text[], integer[], text[], text[], text[], json[], json[], text[], jsonb[], integer[], timestamptz[], timestamptz[], timestamptz[], uuid[], text[], text[])
RETURNS TABLE (ord bigint, id uuid, due_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH pl AS (
        SELECT CASE WHEN $26::uuid[] IS NULL THEN true
                    ELSE (SELECT true FROM (SELECT {schema}.flow_prelock($26::uuid[], $27::text[],
                                                                         $28::text[])) AS l)
               END AS ok
    ), w AS (
        SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::interval[],
                             $6::timestamptz[], $7::json[], $8::jsonb[], $9::text[],
                             $10::integer[], $11::boolean[])
             WITH ORDINALITY AS w(id, token, status, new_token, due_in, due_at, output, error,
                                  step_key, step_attempt, keep_due, ord)
    ), r AS (
        UPDATE {schema}.runs AS t
        SET status = w.status,
            lease_token = w.new_token,
            due_at = CASE WHEN w.keep_due THEN t.due_at
                          WHEN w.due_at IS NOT NULL THEN w.due_at
                          WHEN w.due_in IS NOT NULL THEN {schema}.clock_now() + w.due_in
                     END,
            output = w.output,
            error = w.error,
            step_key = w.step_key,
            step_attempt = w.step_attempt,
            executing = w.keep_due,
            lost_attempts = 0,
            finished_at = CASE WHEN w.status IN ('completed', 'failed', 'cancelled')
                               THEN {schema}.clock_now() END,
            updated_at = {schema}.clock_now()
        FROM w
        WHERE t.id = w.id AND t.lease_token = w.token
          -- IS TRUE: the runs are found by primary key.  Over a large history the
          -- statistics say almost no run is live, and the planner scanned every
          -- live run through runs_status_idx, per batch.
          AND (t.status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')) IS TRUE
          -- Past its run timeout nothing more is recorded: the next claim fails it.
          AND NOT coalesce(t.deadline <= {schema}.clock_now(), false)
          AND (SELECT ok FROM pl)
        RETURNING t.id, t.due_at, w.ord
    ), s AS (
        INSERT INTO {schema}.steps (run_id, key, position, name, kind, status, input, output,
                                    output_type, error, attempts, started_at, finished_at, wake_at)
        -- The run is the write's ($1[ord] is the id its update matched); only
        -- writes that took (in r) record steps, a fenced one none.
        SELECT $1[x.ord], x.key, x.position, x.name, x.kind, x.status, x.input, x.output,
               x.output_type, x.error, x.attempts, x.started_at, x.finished_at,
               CASE WHEN x.kind = 'sleep'
                    THEN coalesce(x.wake_at, (SELECT r.due_at FROM r WHERE r.ord = x.ord))
                    ELSE x.wake_at END
        -- Unnested in a select list, not FROM: each row goes straight on.
        FROM (SELECT unnest($12::bigint[]) AS ord, unnest($13::text[]) AS key,
                     unnest($14::integer[]) AS position, unnest($15::text[]) AS name,
                     unnest($16::text[]) AS kind, unnest($17::text[]) AS status,
                     unnest($18::json[]) AS input, unnest($19::json[]) AS output,
                     unnest($20::text[]) AS output_type, unnest($21::jsonb[]) AS error,
                     unnest($22::integer[]) AS attempts, unnest($23::timestamptz[]) AS started_at,
                     unnest($24::timestamptz[]) AS finished_at,
                     unnest($25::timestamptz[]) AS wake_at) AS x
        WHERE x.ord = ANY (ARRAY(SELECT r.ord FROM r))
        -- A parallel branch's retry state (status 'retrying', migration 0009) is
        -- replaced by the step's next record; nothing else is ever overwritten.
        ON CONFLICT (run_id, key) DO UPDATE
        SET status = EXCLUDED.status, input = EXCLUDED.input, output = EXCLUDED.output,
            output_type = EXCLUDED.output_type, error = EXCLUDED.error,
            attempts = EXCLUDED.attempts, finished_at = EXCLUDED.finished_at,
            wake_at = EXCLUDED.wake_at
        WHERE {schema}.steps.status = 'retrying'
    )
    SELECT ord, id, due_at FROM r;
END
$fn$;
