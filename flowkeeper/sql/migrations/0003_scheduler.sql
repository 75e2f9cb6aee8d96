-- flowkeeper schema, version 3: wake the scheduler loop when a run becomes due
-- without a push.
--
-- `flowkeeper scheduler` LISTENs on "flowkeeper_due" and keeps a timer to the next
-- due time.  A NOTIFY tells it about runs that nobody is pushing: a sleep or a
-- retry released (due later), a trigger without a push (no endpoint, or inside
-- the caller's transaction: delivered only if that transaction commits), a push
-- or a continuation that failed, a dispatch that failed.  Exactly those writes
-- leave a due run without a lease token, so the trigger fires only for them:
-- claims, step writes, heartbeats and completions all hold a token (or clear
-- due_at) and never notify, which keeps NOTIFY's commit-time lock off the hot
-- path.  The payload is "<schema> <due_at as unix seconds>" on the flowkeeper
-- clock: absolute, so that the commit's own latency does not delay the wake-up
-- (one channel for every schema, since a channel name is limited to 63 bytes).

CREATE FUNCTION {schema}.notify_due() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM pg_notify('flowkeeper_due', '{schema} ' || extract(epoch FROM NEW.due_at));
    RETURN NULL;
END
$$;

CREATE TRIGGER runs_notify_due
    AFTER INSERT OR UPDATE OF due_at, lease_token ON {schema}.runs
    FOR EACH ROW
    WHEN (NEW.due_at IS NOT NULL AND NEW.lease_token IS NULL)
    EXECUTE FUNCTION {schema}.notify_due();
