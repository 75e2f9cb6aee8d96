-- Retention of finished runs (flowkeeper.retention, migration 0010).

-- name: prune_runs
-- One small batch per policy and status (see the prune_runs function).
SELECT {schema}.prune_runs($1);

-- name: prune_manual
-- `flowkeeper runs prune`: one batch of runs of status $1 finished more than
-- $2 ago (any workflow), as the retention function picks them.
WITH doomed AS (
    SELECT r.id FROM {schema}.runs r
    WHERE r.status = $1 AND r.finished_at < {schema}.clock_now() - $2::interval
      AND r.due_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM {schema}.alerts a
                      WHERE a.run_id = r.id AND a.due_at IS NOT NULL)
    ORDER BY r.finished_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), d AS (
    DELETE FROM {schema}.runs r USING doomed WHERE r.id = doomed.id RETURNING 1
)
SELECT count(*) FROM d;

-- name: prune_manual_workflow
-- The same for the runs of workflow $4 only.
WITH doomed AS (
    SELECT r.id FROM {schema}.runs r
    WHERE r.status = $1 AND r.finished_at < {schema}.clock_now() - $2::interval
      AND r.workflow = $4
      AND r.due_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM {schema}.alerts a
                      WHERE a.run_id = r.id AND a.due_at IS NOT NULL)
    ORDER BY r.finished_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), d AS (
    DELETE FROM {schema}.runs r USING doomed WHERE r.id = doomed.id RETURNING 1
)
SELECT count(*) FROM d;

-- name: retention_upsert
INSERT INTO {schema}.retention AS p (workflow, completed, failed, cancelled)
VALUES ($1, $2::interval, $3::interval, $4::interval)
ON CONFLICT (workflow) DO UPDATE
SET completed = excluded.completed, failed = excluded.failed, cancelled = excluded.cancelled,
    updated_at = {schema}.clock_now()
WHERE (p.completed, p.failed, p.cancelled)
      IS DISTINCT FROM (excluded.completed, excluded.failed, excluded.cancelled);

-- name: retention_remove_others
-- Policies the serving app no longer declares ($1 the ones it does) are dropped.
DELETE FROM {schema}.retention WHERE NOT (workflow = ANY($1::text[]));

-- name: retention_list
SELECT workflow, completed, failed, cancelled FROM {schema}.retention ORDER BY workflow;
