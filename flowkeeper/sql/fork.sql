-- fk.fork (flowkeeper/fork.py): a new run copying the history of another
-- before a step; the original is left as it is.

-- name: fork_run
-- $1 the new run's id, $2 the source run, $3 the position the fork starts
-- from (steps before it are copied, patch markers included), $4/$5 the push
-- lease, $6 the event detail, $7 the new run's code version.  The source's
-- recorded input is copied as its exact text.  One statement: the new run
-- exists with its whole copied history, or not at all.
WITH src AS (
    SELECT id, workflow, input FROM {schema}.runs WHERE id = $2
), r AS (
    INSERT INTO {schema}.runs (id, workflow, status, input, lease_token, due_at, code_version)
    SELECT $1, src.workflow, 'queued', src.input, $4, {schema}.clock_now() + $5::interval, $7
    FROM src
    RETURNING id
), s AS (
    INSERT INTO {schema}.steps (run_id, key, position, name, kind, status, input, output,
                                output_type, error, attempts, started_at, finished_at, wake_at)
    SELECT r.id, x.key, x.position, x.name, x.kind, x.status, x.input, x.output,
           x.output_type, x.error, x.attempts, x.started_at, x.finished_at, x.wake_at
    FROM r, {schema}.steps x
    WHERE x.run_id = $2 AND x.position < $3
    RETURNING 1
), e AS (
    INSERT INTO {schema}.events (run_id, kind, detail)
    SELECT r.id, 'forked', $6::jsonb FROM r
)
SELECT (SELECT id FROM r) AS id, (SELECT count(*) FROM s) AS copied;
