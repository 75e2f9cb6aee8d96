-- Cron schedules (flowkeeper.schedules, migration 0010).

-- name: schedule_upsert
-- A schedule declared in code, written when the serving app starts.  An
-- unchanged definition keeps its next_at (a deploy never skips or repeats a
-- slot); a changed or revived one starts from $6, the next slot from now.
INSERT INTO {schema}.schedules AS s (workflow, cron, timezone, catch_up, takes_input, next_at,
                                     flow_keys, flow_limits, priority, timeout, start_timeout)
VALUES ($1, $2, $3, $4, $5, $6, $7::text[], $8::integer[], $9, $10::interval, $11::interval)
ON CONFLICT (workflow) DO UPDATE
SET next_at = CASE WHEN s.cron = excluded.cron AND s.timezone = excluded.timezone
                        AND s.removed_at IS NULL AND s.next_at IS NOT NULL
                   THEN s.next_at ELSE excluded.next_at END,
    cron = excluded.cron, timezone = excluded.timezone, catch_up = excluded.catch_up,
    takes_input = excluded.takes_input, flow_keys = excluded.flow_keys,
    flow_limits = excluded.flow_limits, priority = excluded.priority, removed_at = NULL,
    timeout = excluded.timeout, start_timeout = excluded.start_timeout,
    updated_at = {schema}.clock_now()
WHERE (s.cron, s.timezone, s.catch_up, s.takes_input, s.priority, s.removed_at IS NULL)
      IS DISTINCT FROM (excluded.cron, excluded.timezone, excluded.catch_up,
                        excluded.takes_input, excluded.priority, true)
   OR s.flow_keys IS DISTINCT FROM excluded.flow_keys
   OR s.flow_limits IS DISTINCT FROM excluded.flow_limits
   OR (s.timeout, s.start_timeout) IS DISTINCT FROM (excluded.timeout, excluded.start_timeout);

-- name: schedule_remove_others
-- Schedules no longer declared by the serving app stop (kept, for the record).
UPDATE {schema}.schedules
SET removed_at = {schema}.clock_now(), next_at = NULL, updated_at = {schema}.clock_now()
WHERE removed_at IS NULL AND NOT (workflow = ANY($1::text[]))
RETURNING workflow;

-- name: schedules_due
-- The schedules with a slot due, locked for this transaction (SKIP LOCKED:
-- another tick firing them meanwhile is left alone).
SELECT workflow, cron, timezone, catch_up, takes_input, flow_keys, flow_limits, priority,
       timeout, start_timeout, next_at, {schema}.clock_now() AS now
FROM {schema}.schedules
WHERE next_at <= {schema}.clock_now() AND NOT paused AND removed_at IS NULL
ORDER BY next_at
LIMIT $1
FOR UPDATE SKIP LOCKED;

-- name: schedule_fired
-- After a schedule's due slots were turned into runs: the next slot ($2), the
-- last slot fired ($3) and its run ($4), slots fired ($5) and skipped ($6).
UPDATE {schema}.schedules
SET next_at = $2, last_slot = coalesce($3, last_slot), last_run = coalesce($4, last_run),
    fired = fired + $5, skipped = skipped + $6, updated_at = {schema}.clock_now()
WHERE workflow = $1;

-- name: schedule_list
SELECT s.workflow, s.cron, s.timezone, s.catch_up, s.paused, s.removed_at, s.next_at,
       s.last_slot, s.last_run, s.fired, s.skipped, s.updated_at, r.status AS last_status
FROM {schema}.schedules s
LEFT JOIN {schema}.runs r ON r.id = s.last_run
ORDER BY s.removed_at IS NOT NULL, s.workflow;

-- name: schedule_get
SELECT workflow, cron, timezone, catch_up, takes_input, flow_keys, flow_limits, priority,
       timeout, start_timeout, paused, removed_at, next_at, {schema}.clock_now() AS now
FROM {schema}.schedules WHERE workflow = $1;

-- name: schedule_pause
UPDATE {schema}.schedules
SET paused = true, updated_at = {schema}.clock_now()
WHERE workflow = $1
RETURNING workflow;

-- name: schedule_resume
-- Resumed: the slots missed while paused are not caught up; $2 is the next slot.
UPDATE {schema}.schedules
SET paused = false, next_at = $2, updated_at = {schema}.clock_now()
WHERE workflow = $1 AND removed_at IS NULL
RETURNING workflow;
