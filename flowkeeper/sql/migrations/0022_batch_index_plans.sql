-- flowkeeper schema, version 22: group commit's batch of step writes finds
-- its runs by primary key, whatever the tables' size when its plan was made.
--
-- A driver's connection prepares commit_lean_many once; past five runs
-- Postgres may keep a generic plan made with the statistics of that moment.
-- In a new database they say runs holds a few rows, and the plan joined the
-- batch to a scan of every run, and was kept while runs grew, until
-- autovacuum next analyzed it (a minute or more away; never, in a burst
-- shorter than that).  In a scratch probe of a new database growing by 3,000
-- three-step workflows a round, the statement took 0.63 ms of Postgres
-- time per workflow by the fourth round (pg_stat_statements), 0.12 ms with
-- index scans.  The statement is now this function: with enable_seqscan off
-- while it runs, the planner takes the primary key (a lookup in a table of a
-- few rows costs the same).
-- Its body is the statement as version 21's library sent it, which keeps
-- sending it, so a library at version 21 can use this schema.
--
-- CREATE OR REPLACE FUNCTION drops the setting: a later migration that
-- replaces this function must say SET enable_seqscan = off again
-- (tests/integration/test_hot_plans.py checks it).
CREATE FUNCTION {schema}.commit_lean_many(uuid[], uuid[], text[], uuid[], interval[], timestamptz[], json[], jsonb[], text[], integer[], boolean[], bigint[], text[], integer[], text[], text[], text[], json[], json[], text[], jsonb[], integer[], timestamptz[], timestamptz[], timestamptz[], uuid[], text[], text[])
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
        SELECT r.id, x.key, x.position, x.name, x.kind, x.status, x.input, x.output,
               x.output_type, x.error, x.attempts, x.started_at, x.finished_at,
               CASE WHEN x.kind = 'sleep' THEN coalesce(x.wake_at, r.due_at) ELSE x.wake_at END
        FROM unnest($12::bigint[], $13::text[], $14::integer[], $15::text[], $16::text[],
                    $17::text[], $18::json[], $19::json[], $20::text[], $21::jsonb[],
                    $22::integer[], $23::timestamptz[], $24::timestamptz[], $25::timestamptz[])
             AS x(ord, key, position, name, kind, status, input, output, output_type, error,
                  attempts, started_at, finished_at, wake_at)
        JOIN r ON r.ord = x.ord
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
