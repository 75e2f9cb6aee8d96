-- flowkeeper schema, version 16: cron schedules.
--
-- One row per workflow declared with cron=..., written by the serving app when
-- it starts (reconciled: a schedule no longer declared gets removed_at and
-- stops).  next_at is the next slot to fire, in UTC; any driver's tick fires
-- the due slots (flowkeeper.schedules) by inserting one run per slot whose
-- idempotency key is "cron:<slot in UTC>", in the same transaction that moves
-- next_at on: however many drivers tick at once, a slot becomes one run.

CREATE TABLE {schema}.schedules (
    workflow    text PRIMARY KEY,
    cron        text NOT NULL,
    timezone    text NOT NULL,
    catch_up    text NOT NULL CHECK (catch_up IN ('latest', 'all', 'none')),
    takes_input boolean NOT NULL,
    flow_keys   text[],
    flow_limits integer[],
    priority    integer NOT NULL DEFAULT 0,
    timeout       interval,
    start_timeout interval,
    paused      boolean NOT NULL DEFAULT false,
    removed_at  timestamptz,
    next_at     timestamptz,
    last_slot   timestamptz,
    last_run    uuid,
    fired       bigint NOT NULL DEFAULT 0,
    skipped     bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT {schema}.clock_now(),
    updated_at  timestamptz NOT NULL DEFAULT {schema}.clock_now()
);

-- Due schedules, for the ticks and for next_due: only live ones.
CREATE INDEX schedules_due_idx ON {schema}.schedules (next_at)
    WHERE next_at IS NOT NULL AND NOT paused AND removed_at IS NULL;

-- Retention: how long finished runs are kept, per status; workflow '' is the
-- FlowKeeper-wide default, other rows a workflow's own (written by the serving
-- app when it starts, like the schedules).  NULL keeps that status for ever.
CREATE TABLE {schema}.retention (
    workflow   text PRIMARY KEY,
    completed  interval,
    failed     interval,
    cancelled  interval,
    updated_at timestamptz NOT NULL DEFAULT {schema}.clock_now()
);

-- Finished runs, oldest first per status: what pruning reads.  Partial, and
-- entered once per run (when it finishes: that write is not HOT anyway).
CREATE INDEX runs_finished_idx ON {schema}.runs (status, finished_at)
    WHERE finished_at IS NOT NULL;

-- Delete up to `batch` finished runs past their retention, per policy and
-- status: small batches (each a short transaction's worth of row locks, SKIP
-- LOCKED), so every tick can call it while runs are being created.  Never a
-- run an invocation still holds, nor one whose failure alert is undelivered.
-- Steps, history, waits, tokens, stream messages and slots go with their run
-- (ON DELETE CASCADE).  Returns the runs deleted.
CREATE FUNCTION {schema}.prune_runs(batch integer) RETURNS integer
    LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    p record;
    st text;
    keep interval;
    n integer := 0;
    k integer;
BEGIN
    FOR p IN SELECT * FROM {schema}.retention ORDER BY workflow LOOP
        FOREACH st IN ARRAY ARRAY['completed', 'failed', 'cancelled'] LOOP
            keep := CASE st WHEN 'completed' THEN p.completed
                            WHEN 'failed' THEN p.failed ELSE p.cancelled END;
            CONTINUE WHEN keep IS NULL;
            WITH doomed AS (
                SELECT r.id FROM {schema}.runs r
                WHERE r.status = st AND r.finished_at < {schema}.clock_now() - keep
                  AND CASE WHEN p.workflow = ''
                           THEN NOT EXISTS (SELECT 1 FROM {schema}.retention o
                                            WHERE o.workflow = r.workflow)
                           ELSE r.workflow = p.workflow END
                  AND r.due_at IS NULL
                  AND NOT EXISTS (SELECT 1 FROM {schema}.alerts a
                                  WHERE a.run_id = r.id AND a.due_at IS NOT NULL)
                ORDER BY r.finished_at
                LIMIT batch
                FOR UPDATE SKIP LOCKED
            ), d AS (
                DELETE FROM {schema}.runs r USING doomed WHERE r.id = doomed.id RETURNING 1
            )
            SELECT count(*) INTO k FROM d;
            n := n + k;
        END LOOP;
    END LOOP;
    RETURN n;
END
$$;
