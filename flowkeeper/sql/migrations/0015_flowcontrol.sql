-- flowkeeper schema, version 15: flow control in the claim (concurrency limits,
-- priorities), so every driver obeys it: the Python tick, the scheduler loop,
-- pg_cron and trigger's push all end in claim_run, which asks flow_gate first.
--
-- A run of a limited workflow carries its concurrency keys and their limits
-- (computed at trigger time: flow_keys, flow_limits).  It holds a slot of key
-- K while it has a row in `slots` for K AND it is executing under a live lease
-- (executing, lease_token set, due_at in the future): a slot is therefore
-- freed by the write that ends the invocation (a sleep, a wait, a retry, the
-- end), or by the lease running out when the invocation died, with nothing
-- to clean up first.  Sleeping and waiting runs are not executing: no slot.
--
-- A claim over a limit parks the run: queued, not due (due_at NULL, so it is
-- out of runs_due_idx and costs the ticks nothing), blocked_key = the full key.
-- When a holder lets go of a slot (runs_flow_release), the next parked runs of
-- that key (priority first, then trigger order) are made due, in the same
-- transaction.  Counting and waking are serialised per key by a
-- transaction-scoped advisory lock (safe behind PgBouncer), always taken in
-- key order after the run's own row lock: no deadlock, and no park that
-- misses the release it waited for.

ALTER TABLE {schema}.runs
    ADD COLUMN flow_keys text[],
    ADD COLUMN flow_limits integer[],
    ADD COLUMN blocked_key text,
    -- A head start in the due order, in minutes (0..1000): see flowkeeper.flowcontrol.
    ADD COLUMN priority integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 1000),
    -- Run timeouts: fail the run (RunTimeoutError) when it has not finished by
    -- deadline, or not started by start_deadline.  See runs_deadline_cap.
    ADD COLUMN deadline timestamptz,
    ADD COLUMN start_deadline timestamptz,
    -- Rate limits (throttle): the keys, and the spacing between two starts of
    -- each (period / limit).  A run over the rate reserves the next free start
    -- time of its keys and is due then (throttled_until): never dropped.
    ADD COLUMN rate_keys text[],
    ADD COLUMN rate_spacing interval[],
    ADD COLUMN throttled_until timestamptz,
    -- Debounce: triggers of one key while its run has not started update that
    -- run (latest input, due once the key has been quiet for the period).
    ADD COLUMN debounce_key text;

CREATE UNIQUE INDEX runs_debounce_idx ON {schema}.runs (workflow, debounce_key)
    WHERE debounce_key IS NOT NULL AND status = 'queued' AND started_at IS NULL;

-- Per rate key: the earliest time the next start may be reserved (GCRA's
-- "theoretical arrival time", without burst: starts are spaced evenly).
CREATE TABLE {schema}.rate_limits (
    key text PRIMARY KEY,
    tat timestamptz NOT NULL
);

-- Parked runs of a key, in the order they get a slot.  Partial: only parked runs.
CREATE INDEX runs_blocked_idx ON {schema}.runs (blocked_key, priority DESC, id)
    WHERE blocked_key IS NOT NULL AND status = 'queued';

CREATE TABLE {schema}.slots (
    key    text NOT NULL,
    run_id uuid NOT NULL REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    PRIMARY KEY (key, run_id)
);
CREATE INDEX slots_run_idx ON {schema}.slots (run_id);

-- Serialises everything that counts or frees the slots of one key.
CREATE FUNCTION {schema}.flow_lock(keys text[]) RETURNS void
    LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    k text;
BEGIN
    FOR k IN SELECT DISTINCT u.k FROM unnest(keys) AS u(k) ORDER BY u.k LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended('{schema}.slot:' || k, 0));
    END LOOP;
END
$$;

-- Slots of key k held now by runs other than p_run.
-- (PL/pgSQL, not SQL: its plan is cached per session instead of made per call.)
CREATE FUNCTION {schema}.flow_held(k text, p_run uuid) RETURNS integer
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
    RETURN (SELECT count(*)::integer
            FROM {schema}.slots s JOIN {schema}.runs x ON x.id = s.run_id
            WHERE s.key = k AND s.run_id <> p_run
              AND x.executing AND x.lease_token IS NOT NULL
              AND x.due_at > {schema}.clock_now());
END
$$;

-- Make up to (limit - held) parked runs of each key due.  Called with the
-- keys' locks held.  Waking one run too many costs one refused claim (it
-- parks again); waking one too few could strand a key, so it never counts
-- woken-but-not-started runs as holders.
CREATE FUNCTION {schema}.flow_wake(keys text[], limits integer[], p_except uuid)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    i integer;
    free integer;
    n integer := 0;
    woke integer;
BEGIN
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        -- The common case, a limit that does not bind: nobody parked, one probe.
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM {schema}.runs b
                                  WHERE b.blocked_key = keys[i] AND b.status = 'queued');
        free := limits[i] - {schema}.flow_held(keys[i], p_except);
        CONTINUE WHEN free <= 0;
        UPDATE {schema}.runs r
        SET blocked_key = NULL, due_at = {schema}.clock_now() - make_interval(mins => r.priority),
            updated_at = {schema}.clock_now()
        WHERE r.id IN (
            SELECT b.id FROM {schema}.runs b
            WHERE b.blocked_key = keys[i] AND b.status = 'queued' AND b.id <> p_except
            ORDER BY b.priority DESC, b.id
            LIMIT free
            FOR UPDATE SKIP LOCKED);
        GET DIAGNOSTICS woke = ROW_COUNT;
        n := n + woke;
    END LOOP;
    RETURN n;
END
$$;

-- Rate limits, asked by flow_gate for a run about to start: the first time,
-- reserve the next start time of every rate key (the latest of them wins, and
-- each key's next time moves on by its spacing).  Now: go on.  Later: the run
-- is due then, and its claim at that time goes on without asking again.
CREATE FUNCTION {schema}.flow_throttle(r record) RETURNS boolean
    LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    i integer;
    at timestamptz := {schema}.clock_now();
    t timestamptz;
    k text;
BEGIN
    IF r.rate_keys IS NULL OR r.started_at IS NOT NULL OR r.throttled_until IS NOT NULL THEN
        RETURN true;
    END IF;
    FOR k IN SELECT DISTINCT u.k FROM unnest(r.rate_keys) AS u(k) ORDER BY u.k LOOP
        INSERT INTO {schema}.rate_limits (key, tat) VALUES (k, '-infinity')
        ON CONFLICT DO NOTHING;
        SELECT tat INTO t FROM {schema}.rate_limits WHERE key = k FOR UPDATE;
        at := greatest(at, t);
    END LOOP;
    FOR i IN 1 .. array_length(r.rate_keys, 1) LOOP
        UPDATE {schema}.rate_limits SET tat = at + r.rate_spacing[i] WHERE key = r.rate_keys[i];
    END LOOP;
    IF at <= {schema}.clock_now() THEN
        -- Starts now: claim_run sets started_at, so it is never asked again.
        -- (The run's row must not be written here: claim_run writes it next.)
        RETURN true;
    END IF;
    UPDATE {schema}.runs
    SET throttled_until = at, due_at = at, lease_token = NULL, status = 'queued',
        lost_attempts = lost_attempts + CASE WHEN executing THEN 1 ELSE 0 END,
        executing = false, updated_at = {schema}.clock_now()
    WHERE id = r.id;
    INSERT INTO {schema}.events (run_id, kind, detail)
    VALUES (r.id, 'throttled', jsonb_build_object('until', at, 'keys', to_jsonb(r.rate_keys)));
    RETURN false;
END
$$;

-- Asked by claim_run before it takes a run: true lets the claim go on (the
-- run is not limited, or its claim would be refused anyway, or it got a slot
-- of every key); false means the run was parked (or, for a throttled run,
-- made due later) and the claim must take nothing.
CREATE FUNCTION {schema}.flow_gate(p_run uuid, p_token uuid) RETURNS boolean
    LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    r record;
    i integer;
    full_key text;
    which text;
BEGIN
    SELECT id, status, lease_token, due_at, flow_keys, flow_limits, executing, started_at,
           deadline, start_deadline, rate_keys, rate_spacing, throttled_until INTO r
    FROM {schema}.runs WHERE id = p_run FOR UPDATE;
    IF r.id IS NULL THEN
        RETURN true;
    END IF;
    IF r.status NOT IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')
       OR NOT ((r.lease_token = p_token) IS TRUE OR r.due_at <= {schema}.clock_now()) THEN
        RETURN true;  -- claim_run refuses it by itself
    END IF;
    -- A deadline passed: the run fails, whatever it was doing.  An invocation
    -- still executing a step loses its lease here, so its result is refused.
    IF r.deadline <= {schema}.clock_now()
       OR (r.started_at IS NULL AND r.start_deadline <= {schema}.clock_now()) THEN
        which := CASE WHEN r.started_at IS NULL AND r.start_deadline <= {schema}.clock_now()
                      THEN 'start_timeout' ELSE 'timeout' END;
        UPDATE {schema}.runs
        SET status = 'failed', lease_token = NULL, due_at = NULL, executing = false,
            lost_attempts = 0, finished_at = {schema}.clock_now(),
            updated_at = {schema}.clock_now(),
            error = jsonb_build_object(
                'type', 'flowkeeper.errors.RunTimeoutError',
                'message', CASE WHEN which = 'start_timeout'
                    THEN 'The run did not start within its start_timeout (deadline '
                         || to_char(r.start_deadline AT TIME ZONE 'UTC',
                                    'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                         || '); it was failed without running.'
                    ELSE 'The run did not finish within its timeout (deadline '
                         || to_char(r.deadline AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                         || '); it was failed, and the result of a step still executing '
                         || 'then is discarded.' END,
                'deadline', which,
                'traceback', NULL)
        WHERE id = p_run;
        INSERT INTO {schema}.events (run_id, kind, detail)
        VALUES (p_run, 'timed_out', jsonb_build_object(
            'deadline', which,
            'at', CASE WHEN which = 'start_timeout' THEN r.start_deadline ELSE r.deadline END));
        RETURN false;
    END IF;
    IF r.flow_keys IS NULL THEN
        RETURN {schema}.flow_throttle(r);
    END IF;
    PERFORM {schema}.flow_lock(r.flow_keys);
    FOR i IN 1 .. array_length(r.flow_keys, 1) LOOP
        IF {schema}.flow_held(r.flow_keys[i], p_run) >= r.flow_limits[i] THEN
            full_key := r.flow_keys[i];
            EXIT;
        END IF;
    END LOOP;
    IF full_key IS NULL THEN
        INSERT INTO {schema}.slots (key, run_id)
        SELECT k, p_run FROM unnest(r.flow_keys) AS u(k)
        ON CONFLICT DO NOTHING;
        RETURN {schema}.flow_throttle(r);
    END IF;
    -- Park.  An invocation that died inside a step is charged its lost
    -- attempt here, as claim_run would have (see migration 0005).
    UPDATE {schema}.runs
    SET status = 'queued', blocked_key = full_key, due_at = NULL, lease_token = NULL,
        lost_attempts = lost_attempts + CASE WHEN executing THEN 1 ELSE 0 END,
        executing = false, updated_at = {schema}.clock_now()
    WHERE id = p_run;
    INSERT INTO {schema}.events (run_id, kind, detail)
    SELECT p_run, 'blocked', jsonb_build_object('key', full_key,
               'limit', r.flow_limits[array_position(r.flow_keys, full_key)])
    WHERE NOT EXISTS (SELECT 1 FROM {schema}.events e
                      WHERE e.run_id = p_run AND e.kind = 'blocked'
                        AND e.id > coalesce((SELECT max(e2.id) FROM {schema}.events e2
                                             WHERE e2.run_id = p_run AND e2.kind <> 'blocked'),
                                            0));
    -- The other keys may have room this run is no longer waiting for.
    PERFORM {schema}.flow_wake(r.flow_keys, r.flow_limits, p_run);
    RETURN false;
END
$$;

-- A run that may have held slots stops executing under a live lease: free its
-- slots and wake the next parked runs of its keys.
CREATE FUNCTION {schema}.flow_release() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM {schema}.flow_lock(OLD.flow_keys);
    DELETE FROM {schema}.slots WHERE run_id = OLD.id;
    PERFORM {schema}.flow_wake(OLD.flow_keys, OLD.flow_limits, OLD.id);
    RETURN NULL;
END
$$;

CREATE TRIGGER runs_flow_release
    AFTER UPDATE OF executing, lease_token, status ON {schema}.runs
    FOR EACH ROW
    WHEN (OLD.flow_keys IS NOT NULL AND OLD.executing
          AND NOT (NEW.executing AND NEW.lease_token IS NOT NULL
                   AND NEW.status IN ('running', 'cancelled')))
    EXECUTE FUNCTION {schema}.flow_release();

-- A safety net run by the ticks now and then: keys with parked runs and free
-- slots (a woken run cancelled before it started, say) get their next runs
-- woken.  One index probe per distinct parked key, at most max_keys of them.
CREATE FUNCTION {schema}.flow_sweep(max_keys integer) RETURNS integer
    LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    k text;
    r record;
    n integer := 0;
BEGIN
    FOR k IN
        WITH RECURSIVE b AS (
            (SELECT blocked_key FROM {schema}.runs
             WHERE blocked_key IS NOT NULL AND status = 'queued'
             ORDER BY blocked_key LIMIT 1)
            UNION ALL
            SELECT (SELECT x.blocked_key FROM {schema}.runs x
                    WHERE x.blocked_key > b.blocked_key AND x.status = 'queued'
                    ORDER BY x.blocked_key LIMIT 1)
            FROM b WHERE b.blocked_key IS NOT NULL
        )
        SELECT blocked_key FROM b WHERE blocked_key IS NOT NULL LIMIT max_keys
    LOOP
        SELECT flow_keys, flow_limits INTO r FROM {schema}.runs
        WHERE blocked_key = k AND status = 'queued' LIMIT 1;
        CONTINUE WHEN r.flow_keys IS NULL;
        PERFORM {schema}.flow_lock(ARRAY[k]);
        n := n + {schema}.flow_wake(ARRAY[k],
                                     ARRAY[r.flow_limits[array_position(r.flow_keys, k)]],
                                     '00000000-0000-0000-0000-000000000000'::uuid);
    END LOOP;
    RETURN n;
END
$$;

-- A run with a deadline is due at that deadline at the latest, whatever it is
-- doing (a lease, a sleep, a wait, parked on a key): a claim then fails it
-- (flow_gate), so no driver has to look for timed-out runs.
CREATE FUNCTION {schema}.flow_deadline_cap() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    cap timestamptz;
BEGIN
    IF NEW.status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting') THEN
        cap := least(NEW.deadline,
                     CASE WHEN NEW.started_at IS NULL THEN NEW.start_deadline END);
        IF cap IS NOT NULL AND (NEW.due_at IS NULL OR NEW.due_at > cap) THEN
            NEW.due_at := cap;
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER runs_deadline_cap
    BEFORE INSERT OR UPDATE ON {schema}.runs
    FOR EACH ROW
    WHEN (NEW.deadline IS NOT NULL OR NEW.start_deadline IS NOT NULL)
    EXECUTE FUNCTION {schema}.flow_deadline_cap();
