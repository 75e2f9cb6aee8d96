-- flowkeeper schema, version 1.
-- "{schema}" is replaced by the configured (validated) schema name.

-- The clock every due time is compared with.  Tests swap its body for one
-- with an adjustable offset (flowkeeper.testing.FakeClock); in production it
-- is now(), which the planner inlines.
CREATE FUNCTION {schema}.clock_now() RETURNS timestamptz
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT now() $$;

CREATE TABLE {schema}.runs (
    -- UUIDv7, made by the client: time-ordered, so "newest first" is a
    -- backwards scan of the primary key and inserts stay at the index's end.
    id                uuid PRIMARY KEY,
    workflow          text NOT NULL,
    status            text NOT NULL DEFAULT 'queued' CHECK (status IN (
                          'queued', 'running', 'sleeping', 'retrying',
                          'completed', 'failed', 'cancelled')),
    input             jsonb,
    output            jsonb,
    error             jsonb,
    idempotency_key   text,
    -- When the run next needs attention: queued/handed-on (now), a sleep's
    -- wake time, a retry's time, or the expiry of the current lease.  NULL
    -- once the run has finished, which takes it out of runs_due_idx.
    due_at            timestamptz,
    -- The holder of the run: set by whoever dispatched or executes it.  Every
    -- write under a lease checks it (fencing).
    lease_token       uuid,
    -- The step at the frontier that is being retried, and its failed attempts.
    step_key          text,
    step_attempt      integer NOT NULL DEFAULT 0,
    dispatch_failures integer NOT NULL DEFAULT 0,
    invocations       integer NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT {schema}.clock_now(),
    updated_at        timestamptz NOT NULL DEFAULT {schema}.clock_now(),
    started_at        timestamptz,
    finished_at       timestamptz
) WITH (fillfactor = 70);  -- room on each page for HOT updates of a run in flight

-- The scheduler's only access path: due runs, oldest first.  Partial, so its
-- size follows the live runs, not the history.
CREATE INDEX runs_due_idx ON {schema}.runs (due_at) WHERE due_at IS NOT NULL;

-- Idempotency keys are unique per workflow.
CREATE UNIQUE INDEX runs_idempotency_idx ON {schema}.runs (workflow, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Recorded history: one row per completed (or finally failed) step and per
-- durable sleep, keyed by (run, step key).
CREATE TABLE {schema}.steps (
    run_id      uuid NOT NULL REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    key         text NOT NULL,
    position    integer NOT NULL,
    name        text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('step', 'sleep')),
    status      text NOT NULL CHECK (status IN ('completed', 'failed', 'sleeping')),
    input       jsonb,
    output      jsonb,
    output_type text,
    error       jsonb,
    attempts    integer NOT NULL DEFAULT 1,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz,
    wake_at     timestamptz,
    PRIMARY KEY (run_id, key)
);

-- What happened to a run besides its recorded steps: failed attempts,
-- cancellations, replays, dispatch problems.  Read per run, in order.
CREATE TABLE {schema}.events (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id   uuid NOT NULL REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    at       timestamptz NOT NULL DEFAULT {schema}.clock_now(),
    kind     text NOT NULL,
    step_key text,
    attempt  integer,
    detail   jsonb
);
CREATE INDEX events_run_idx ON {schema}.events (run_id, id);
