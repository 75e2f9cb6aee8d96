-- flowkeeper schema, version 9: parallel steps keep their own retry state.
--
-- A run's `step_key`/`step_attempt` hold the retry state of the one step a
-- sequential workflow is at.  Branches of an asyncio.gather / ctx.map retry
-- independently, so each failed attempt of a branch step is recorded in its
-- own history row (status 'retrying': attempts so far, the last error, and
-- when the next attempt is due in `wake_at`).  The row is overwritten by the
-- step's final record (completed or failed) in the commit that writes it.
ALTER TABLE {schema}.steps DROP CONSTRAINT steps_status_check;
ALTER TABLE {schema}.steps ADD CONSTRAINT steps_status_check
    CHECK (status IN ('completed', 'failed', 'sleeping', 'waiting', 'timed_out', 'retrying'));
