-- flowkeeper schema, version 23: rate limits on single steps
-- (ctx.step(..., rate_limit="openai"), flowkeeper.steprates).
--
-- A rate-limited step takes the next start time of its limit from
-- rate_limits (key "step:<name>", the same spacing as run-level limits).
-- When that time is further off than the invocation will wait, the run
-- sleeps until then, and the time it took is kept here, so that the run,
-- resumed, starts the step then instead of taking another: a reservation
-- is made once per attempt, however often the run is woken early or handed
-- on.  Used tickets are deleted; a ticket never used (the run cancelled
-- meanwhile) goes with its run.  Nothing older reads this table, so a
-- library at version 22 can use this schema.
CREATE TABLE {schema}.step_tickets (
    run_id   uuid NOT NULL REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    step_key text NOT NULL,
    attempt  integer NOT NULL,
    slot     timestamptz NOT NULL,
    PRIMARY KEY (run_id, step_key, attempt)
);
