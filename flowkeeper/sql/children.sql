-- Child runs (flowkeeper.children; schema in migration 0010).

-- name: start_child
-- Start a child under the parent's lease, once per (parent, step key).
SELECT child_id, created, push_token
FROM {schema}.start_child($1, $2, $3, $4, $5::json, $6, $7, $8, $9, $10::interval);

-- name: wait_children
-- Register or re-check a parent's wait for its children; suspends it unless
-- they have all finished (see migration 0010).
SELECT {schema}.wait_children($1, $2, $3, $4, $5, $6::uuid[], $7, $8, $9, $10) AS outcome;

-- name: suspend_for_children
-- Suspend a parent whose parallel branches all wait (some for children).
SELECT {schema}.suspend_for_children($1, $2, $3::text[], $4) AS done;

-- name: children_results
-- The awaited children's outcomes, read only when the parent's replay needs them.
SELECT id, workflow, status, output::text AS output, error::text AS error
FROM {schema}.runs WHERE id = ANY ($1::uuid[]);

-- name: wake_parent
-- After a child finished: when that made its parent due, lease the parent to
-- this process's push ($2 for $3), so it resumes at once rather than at the
-- next tick.
UPDATE {schema}.runs p
SET lease_token = $2, due_at = {schema}.clock_now() + $3::interval
FROM {schema}.runs c
WHERE c.id = $1 AND p.id = c.parent_id AND p.status = 'waiting'
  AND p.due_at <= {schema}.clock_now()
RETURNING p.id;

-- name: run_children
-- A run's children, oldest first (dashboard, CLI).
SELECT id, workflow, status, parent_step, created_at, finished_at
FROM {schema}.runs WHERE parent_id = $1
ORDER BY created_at, id
LIMIT $2;

-- name: count_children
SELECT count(*) AS n FROM {schema}.runs WHERE parent_id = $1;

-- name: run_parent
SELECT parent_id, parent_step FROM {schema}.runs WHERE id = $1;
