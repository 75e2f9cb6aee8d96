-- flowkeeper schema, version 10: cron schedules.
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
