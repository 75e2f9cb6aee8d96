-- flowkeeper schema, version 5: attempts lost with their process are counted.
--
-- An invocation that dies inside a step (SIGKILL, out of memory, a host's
-- time limit, os._exit) writes nothing, and its lease expires.  Without a
-- record of that, the step ran again at every expiry, for ever, and its retry
-- policy never applied.  Every claim by an invocation that will execute steps
-- sets `executing`; every write that ends or hands on the invocation clears
-- it.  A claim that finds it still set knows the previous invocation died
-- while executing, so inside the step at the frontier: it counts one lost
-- attempt, in the same statement, and the engine charges those attempts to
-- that step (and fails it once its retry policy is spent).  No extra write on
-- the hot path: the flag rides on the claim and on the writes already made.
ALTER TABLE {schema}.runs
    ADD COLUMN executing boolean NOT NULL DEFAULT false,
    ADD COLUMN lost_attempts integer NOT NULL DEFAULT 0;
