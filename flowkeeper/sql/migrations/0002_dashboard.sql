-- flowkeeper schema: the dashboard's filters, failure alerts, login throttling.
-- "{schema}" is replaced by the configured (validated) schema name.

-- The runs list filters by status and by workflow, newest first.  Run ids are
-- UUIDv7, so "newest first" is "id descending" and a time range is an id
-- range: (status, id) serves a status filter and the per-status counts
-- (index-only); (workflow, status, id) serves a workflow filter, with or
-- without a status, and that workflow's counts.  Writes that change a run's
-- status or due_at are not HOT and add one entry to each; the engine's
-- mid-run flushes change neither and stay HOT.
CREATE INDEX runs_status_idx ON {schema}.runs (status, id);
CREATE INDEX runs_workflow_idx ON {schema}.runs (workflow, status, id);

-- Failure alerts: an outbox row per run that failed for good, written by a
-- trigger in the same transaction as the status change (whichever code path
-- made it), so an alert can neither be lost nor delay the run.  Delivered
-- right after the commit by the invocation that failed the run, and retried
-- with backoff by the scheduler tick until every destination took it.
CREATE TABLE {schema}.alerts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      uuid NOT NULL REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT {schema}.clock_now(),
    -- When the next delivery attempt is due; NULL once settled.
    due_at      timestamptz DEFAULT {schema}.clock_now(),
    attempts    integer NOT NULL DEFAULT 0,
    -- Destinations that accepted it ('webhook', 'hook'): never sent twice.
    done        text[] NOT NULL DEFAULT '{}',
    last_error  text,
    settled_at  timestamptz,
    outcome     text CHECK (outcome IN ('delivered', 'abandoned'))
);
CREATE INDEX alerts_due_idx ON {schema}.alerts (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX alerts_run_idx ON {schema}.alerts (run_id);

CREATE FUNCTION {schema}.enqueue_failure_alert() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {schema}.alerts (run_id) VALUES (NEW.id);
    RETURN NULL;
END $$;

-- The WHEN clause keeps the cost off every other update of a run.
CREATE TRIGGER runs_failure_alert
    AFTER UPDATE OF status ON {schema}.runs
    FOR EACH ROW
    WHEN (NEW.status = 'failed' AND OLD.status IS DISTINCT FROM 'failed')
    EXECUTE FUNCTION {schema}.enqueue_failure_alert();

-- Failed dashboard logins per client, so guessing the password is slow
-- across every instance of a horizontally scaled (or serverless) app.
CREATE TABLE {schema}.login_failures (
    client       text PRIMARY KEY,
    failures     integer NOT NULL,
    window_start timestamptz NOT NULL
);
