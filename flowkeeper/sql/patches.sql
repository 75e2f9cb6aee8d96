-- Versioning (flowkeeper/patches.py): which branch of each patch the live runs took.
-- A patch marker is a steps row of kind 'patch', key '#patch:<id>', output
-- true (new branch) or false (old branch).  Operator queries (CLI, dashboard),
-- not the hot path: they read the live runs, then each one's markers by primary key.

-- name: patch_counts
-- Live runs per patch, workflow and branch.
SELECT s.name AS patch, r.workflow, (s.output::text = 'true') AS new_branch, count(*) AS n
FROM {schema}.runs r
JOIN {schema}.steps s ON s.run_id = r.id AND s.kind = 'patch'
WHERE r.status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')
GROUP BY 1, 2, 3
ORDER BY 1, 2, 3;

-- name: patch_unreached
-- Live runs of the workflows that know patch $1 that have not reached it yet.
SELECT r.workflow, count(*) AS n
FROM {schema}.runs r
WHERE r.status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')
  AND r.workflow = ANY($2::text[])
  AND NOT EXISTS (SELECT 1 FROM {schema}.steps s WHERE s.run_id = r.id AND s.key = $1)
GROUP BY 1
ORDER BY 1;

-- name: patch_runs
-- Live runs that took branch $2 (true: new) of patch key $1, newest first.
SELECT r.id, r.workflow, r.status, r.code_version, r.created_at
FROM {schema}.runs r
JOIN {schema}.steps s ON s.run_id = r.id AND s.key = $1
WHERE r.status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')
  AND (s.output::text = 'true') = $2
ORDER BY r.id DESC
LIMIT $3;
