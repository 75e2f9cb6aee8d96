-- flowkeeper schema, version 14: observability (flowkeeper.steplogs, .health, .tracing).
--
-- step_logs: the log lines a run's code emitted (through any logger, or print),
-- each with its step key and attempt (NULL: the workflow function itself).
-- Bounded by the writers: a cap per step per invocation, and one per run
-- enforced by the insert (sql/steplogs.sql).
CREATE TABLE {schema}.step_logs (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id   uuid NOT NULL REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    step_key text,
    attempt  integer,
    level    integer NOT NULL,
    logger   text NOT NULL,
    message  text NOT NULL,
    at       timestamptz NOT NULL
);
CREATE INDEX step_logs_run_idx ON {schema}.step_logs (run_id, id);

-- driver_ticks: when each driver last ticked (flowkeeper.health), one row per
-- kind ('cli', 'http', 'loop', 'pgcron') and place (host:pid, the endpoint...).
-- `flowkeeper doctor` and the dashboard read it to say whether anything is
-- dispatching due runs at all.
CREATE TABLE {schema}.driver_ticks (
    kind        text NOT NULL,
    place       text NOT NULL,
    last_at     timestamptz NOT NULL DEFAULT {schema}.clock_now(),
    ticks       bigint NOT NULL DEFAULT 1,
    claimed     integer NOT NULL DEFAULT 0,
    failed      integer NOT NULL DEFAULT 0,
    last_error  text,
    PRIMARY KEY (kind, place)
);

-- run_traces: the W3C trace context of the code that triggered a run (or sent
-- the event that started it), so every invocation's spans join that trace.
-- Written only when tracing is configured.
CREATE TABLE {schema}.run_traces (
    run_id   uuid PRIMARY KEY REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    carrier  json NOT NULL
);
