-- Events, waits and approval tokens (flowkeeper.events, flowkeeper.tokens).
-- The work is done by the functions of migration 0007, which take the
-- advisory locks that keep events and waits from missing each other.

-- name: register_wait
SELECT outcome, payload, event_id, due_at
FROM {schema}.register_wait($1, $2, $3, $4, $5, $6, $7, $8::text[], $9::jsonb, $10::json,
                            $11::jsonb, $12, $13, $14, $15);

-- name: resume_wait
-- A recorded wait that was still waiting when this invocation claimed the run
-- ($1, lease $2, wait $3): its payload if it was resolved meanwhile, else
-- 'timed_out' once its time is up ($4 true), else the run waits again.
SELECT status, payload FROM {schema}.resume_wait($1, $2, $3, $4);

-- name: send_event
-- Event $1 (dedup id $2, payload $3, sealed under a codec) sent by run $4;
-- waits match on $6, the data's match index (NULL: the payload itself).
SELECT kind, event_id, run_id, lease
FROM {schema}.send_event($1, $2, $3::json, $4, $5::interval, $6::jsonb);

-- name: event_started
-- Runs started by event $1 (workflows with on_event=its name).
UPDATE {schema}.event_log SET started = started || $2::uuid[] WHERE id = $1;

-- name: create_token
INSERT INTO {schema}.tokens (id, run_id, name, expires_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT (id) DO NOTHING;

-- name: complete_token
SELECT outcome, run_id, lease FROM {schema}.complete_token($1, $2::json, $3::interval);

-- name: list_events
-- Recent events, newest first, before id $1 (NULL: the newest), optionally of
-- name $3 or with sender id $4; with how many runs each woke or cancelled.
SELECT e.id, e.name, e.event_key, e.payload::text AS payload, e.sent_at, e.sent_by_run,
       e.started,
       (SELECT count(*) FROM {schema}.waits w
        WHERE w.resolved_event = e.id AND w.outcome = 'event') AS woke,
       (SELECT count(*) FROM {schema}.waits w
        WHERE w.resolved_event = e.id AND w.outcome = 'cancelled') AS cancelled
FROM {schema}.event_log e
WHERE ($1::bigint IS NULL OR e.id < $1::bigint)
  AND ($3::text IS NULL OR e.name = $3::text)
  AND ($4::text IS NULL OR e.event_key = $4::text)
ORDER BY e.id DESC
LIMIT $2;

-- name: get_event
SELECT e.id, e.name, e.event_key, e.payload::text AS payload, e.sent_at, e.sent_by_run,
       e.started
FROM {schema}.event_log e WHERE e.id = $1;

-- name: event_effects
-- The waits event $1 resolved: which runs it woke (outcome 'event') or
-- cancelled (outcome 'cancelled'), and at which wait.
SELECT w.run_id, w.key, w.outcome, w.resolved_at, r.workflow, r.status
FROM {schema}.waits w JOIN {schema}.runs r ON r.id = w.run_id
WHERE w.resolved_event = $1
ORDER BY w.resolved_at, w.run_id
LIMIT 1000;

-- name: run_waits
-- What run $1 waits or waited for (the dashboard's timeline and runs show),
-- with the name of the approval token a token wait is for.
SELECT w.key, w.kind, w.event_name, w.match::text AS match, w.token_id, t.name AS token_name,
       w.expires_at, w.created_at, w.resolved_at, w.resolved_event, w.outcome
FROM {schema}.waits w LEFT JOIN {schema}.tokens t ON t.id = w.token_id
WHERE w.run_id = $1
ORDER BY w.created_at, w.key;

-- name: prune_events
-- Delete up to $2 events sent before now - $1 that no live run can still
-- match: older than the start of the oldest live run (whose waits look back
-- at most to their run's start by default).
WITH oldest AS (
    SELECT min(created_at) AS at FROM {schema}.runs
    WHERE status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')
), doomed AS (
    SELECT e.id FROM {schema}.event_log e, oldest
    WHERE e.sent_at < {schema}.clock_now() - $1::interval
      AND (oldest.at IS NULL OR e.sent_at < oldest.at)
    ORDER BY e.sent_at
    LIMIT $2
)
DELETE FROM {schema}.event_log e USING doomed WHERE e.id = doomed.id;

-- name: prune_waits
-- Forget up to $1 unresolved waits of finished runs (cancel_on rules of runs
-- that ended, waits of runs cancelled meanwhile): they can match nothing.
WITH doomed AS (
    SELECT w.run_id, w.key FROM {schema}.waits w JOIN {schema}.runs r ON r.id = w.run_id
    WHERE w.resolved_at IS NULL AND r.status IN ('completed', 'failed', 'cancelled')
    LIMIT $1
)
UPDATE {schema}.waits w SET resolved_at = {schema}.clock_now()
FROM doomed WHERE w.run_id = doomed.run_id AND w.key = doomed.key;

-- name: register_cancel_rule
SELECT {schema}.register_cancel_rule($1, $2, $3, $4, $5::text[], $6::jsonb, $7::json,
                                     $8::jsonb, $9) AS outcome;
