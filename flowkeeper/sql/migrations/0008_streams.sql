-- flowkeeper schema, version 8: a run's stream of progress messages.
--
-- ctx.publish appends here; fk.stream and GET <endpoint>/runs/<id>/stream read
-- it, from a cursor (the message id), live until the run ends.  Each message
-- published inside a step carries the step's key and attempt, so a reader can
-- tell the messages of an attempt that later failed (or died with its
-- process) from those of the attempt whose result was recorded.
CREATE TABLE {schema}.stream_messages (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id   uuid NOT NULL REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    topic    text NOT NULL,
    step_key text,
    attempt  integer,
    data     json NOT NULL,
    at       timestamptz NOT NULL DEFAULT {schema}.clock_now()
);
CREATE INDEX stream_messages_run_idx ON {schema}.stream_messages (run_id, id);
