-- flowkeeper schema, version 7: events, waits and approval tokens.
--
-- One history model, one way to suspend.  A wait is a history entry (a row of
-- `steps`, kind 'wait', status 'waiting') like a step or a sleep; what it waits
-- for is indexed in `waits`.  Whatever satisfies it (an event, a token being
-- completed) records the payload in that history entry and makes the run due
-- in the same transaction; a timeout is the run's due time, as for a sleep.
-- The drivers treat every resumption alike.
--
-- Run history events stay in `events`; events sent by applications live in
-- `event_log`.

ALTER TABLE {schema}.runs DROP CONSTRAINT runs_status_check;
ALTER TABLE {schema}.runs ADD CONSTRAINT runs_status_check CHECK (status IN (
    'queued', 'running', 'sleeping', 'retrying', 'waiting',
    'completed', 'failed', 'cancelled'));

ALTER TABLE {schema}.steps DROP CONSTRAINT steps_kind_check;
ALTER TABLE {schema}.steps ADD CONSTRAINT steps_kind_check
    CHECK (kind IN ('step', 'sleep', 'wait'));
ALTER TABLE {schema}.steps DROP CONSTRAINT steps_status_check;
ALTER TABLE {schema}.steps ADD CONSTRAINT steps_status_check
    CHECK (status IN ('completed', 'failed', 'sleeping', 'waiting', 'timed_out'));

-- Events sent with fk.send_event / ctx.send_event.  `payload` is the exact
-- JSON the sender wrote (what a wait returns, key order and numbers kept);
-- `data` the same as jsonb, for containment look-ups (the lookback of a wait
-- that starts after its event was sent).
CREATE TABLE {schema}.event_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL,
    event_key   text UNIQUE,           -- the sender's dedup id
    payload     json NOT NULL,
    data        jsonb NOT NULL,
    sent_at     timestamptz NOT NULL DEFAULT {schema}.clock_now(),
    sent_by_run uuid,                  -- ctx.send_event: the run that sent it
    started     uuid[] NOT NULL DEFAULT '{}'  -- runs of workflows with on_event=name
);
CREATE INDEX event_log_name_idx ON {schema}.event_log (name, id);
CREATE INDEX event_log_name_sent_idx ON {schema}.event_log (name, sent_at);
CREATE INDEX event_log_data_idx ON {schema}.event_log USING gin (data jsonb_path_ops);
CREATE INDEX event_log_sent_idx ON {schema}.event_log (sent_at);

-- What each live wait is waiting for.  An event wait matches on its event
-- name and on the values at its match paths: `paths` (sorted) is the wait's
-- shape and `match_values` the values there, so an event is matched by one
-- index probe per shape (see send_event), not by a scan of the waiting runs.
-- kind 'cancel' is a workflow's cancel_on rule; kind 'token' waits for an
-- approval token.
CREATE TABLE {schema}.waits (
    run_id         uuid NOT NULL REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    key            text NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('event', 'token', 'cancel')),
    event_name     text,
    paths          text[] NOT NULL DEFAULT '{}',
    match_values   jsonb NOT NULL DEFAULT '[]',
    match          json,               -- as the workflow gave it, for display
    token_id       text,
    lookback_since timestamptz,
    expires_at     timestamptz,
    created_at     timestamptz NOT NULL DEFAULT {schema}.clock_now(),
    resolved_at    timestamptz,
    resolved_event bigint,
    outcome        text CHECK (outcome IN ('event', 'token', 'timed_out', 'cancelled')),
    PRIMARY KEY (run_id, key)
);
CREATE INDEX waits_match_idx ON {schema}.waits (event_name, paths, match_values)
    WHERE resolved_at IS NULL AND event_name IS NOT NULL;
CREATE INDEX waits_token_idx ON {schema}.waits (token_id)
    WHERE resolved_at IS NULL AND token_id IS NOT NULL;
CREATE INDEX waits_event_idx ON {schema}.waits (resolved_event) WHERE resolved_event IS NOT NULL;

-- Every shape (event name, match paths) a wait has ever had.  Added under an
-- exclusive per-name lock, so a send that started before a new shape existed
-- has committed before any wait of that shape looks back (see register_wait).
CREATE TABLE {schema}.wait_shapes (
    event_name text NOT NULL,
    paths      text[] NOT NULL,
    PRIMARY KEY (event_name, paths)
);

-- Approval tokens (ctx.create_token): completed once, by a signed URL or code.
CREATE TABLE {schema}.tokens (
    id           text PRIMARY KEY,
    run_id       uuid NOT NULL REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    name         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT {schema}.clock_now(),
    expires_at   timestamptz,
    completed_at timestamptz,
    payload      json
);
CREATE INDEX tokens_run_idx ON {schema}.tokens (run_id);

-- The values of `data` at `paths` (dot-separated), as one jsonb array: the
-- index key of an event for one wait shape.  A missing field is JSON null.
CREATE FUNCTION {schema}.match_values(data jsonb, paths text[]) RETURNS jsonb
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT coalesce(jsonb_agg(coalesce(data #> string_to_array(p, '.'), 'null'::jsonb)
                              ORDER BY o), '[]'::jsonb)
    FROM unnest(paths) WITH ORDINALITY AS u(p, o)
$$;

-- The advisory-lock keys: one per event name, one per (name, shape, values).
CREATE FUNCTION {schema}.event_lock(name text) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT hashtextextended('flowkeeper.event:' || name, 0) $$;
CREATE FUNCTION {schema}.match_lock(name text, paths text[], vals jsonb) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT hashtextextended(
              'flowkeeper.match:' || name || chr(1) || array_to_string(paths, chr(2))
              || chr(1) || vals::text, 0) $$;

-- Locking, so that no event and no wait ever miss each other.  A send holds
-- the name's lock shared and, for each wait shape it knows, the lock of its
-- match values exclusively, until it commits; a wait of a known shape takes
-- the name's lock shared and the lock of its own match values exclusively; a
-- wait of a new shape takes the name's lock exclusively (waiting for every
-- send in flight to commit) and records the shape.  So when a wait looks back
-- for an event already sent, every send it could have missed has committed
-- and is visible; and a send that commits after that sees the wait.  All are
-- transaction-scoped locks: safe behind transaction poolers.

-- The first event p_event sent since p_since that matches p_containment and
-- has not resolved a wait of run p_run yet (a wait's lookback).  With a match
-- the GIN index on data finds the candidates (ordering by id + 0 keeps the
-- planner from walking the primary key instead); without one, the events of
-- that name since p_since are read in order from (name, sent_at).
CREATE FUNCTION {schema}.lookback_event(
    p_run uuid, p_event text, p_paths text[], p_containment jsonb, p_since timestamptz)
    RETURNS TABLE (id bigint, payload json)
    LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
BEGIN
    IF cardinality(p_paths) > 0 THEN
        RETURN QUERY
        SELECT e.id, e.payload FROM {schema}.event_log e
        WHERE e.data @> p_containment AND e.name = p_event AND e.sent_at >= p_since
          AND NOT EXISTS (SELECT 1 FROM {schema}.waits w
                          WHERE w.run_id = p_run AND w.resolved_event = e.id)
        ORDER BY e.id + 0
        LIMIT 1;
    ELSE
        RETURN QUERY
        SELECT e.id, e.payload FROM {schema}.event_log e
        WHERE e.name = p_event AND e.sent_at >= p_since
          AND NOT EXISTS (SELECT 1 FROM {schema}.waits w
                          WHERE w.run_id = p_run AND w.resolved_event = e.id)
        ORDER BY e.sent_at, e.id
        LIMIT 1;
    END IF;
END
$$;

-- The locks a new wait (or cancel_on rule) of event p_event with match p_paths
-- = p_values takes before it looks back (see above); a new shape is recorded.
CREATE FUNCTION {schema}.lock_wait_match(p_event text, p_paths text[], p_values jsonb)
    RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM {schema}.wait_shapes s
               WHERE s.event_name = p_event AND s.paths = p_paths) THEN
        PERFORM pg_advisory_xact_lock_shared({schema}.event_lock(p_event));
        PERFORM pg_advisory_xact_lock({schema}.match_lock(p_event, p_paths, p_values));
    ELSE
        PERFORM pg_advisory_xact_lock({schema}.event_lock(p_event));
        INSERT INTO {schema}.wait_shapes VALUES (p_event, p_paths) ON CONFLICT DO NOTHING;
    END IF;
END
$$;

-- Record wait p_key of run p_run (under lease p_token) and either resolve it at
-- once (an event sent since p_lookback and not yet used by this run, or a
-- token already completed) or suspend the run until p_expires (NULL: until it
-- is resolved).  Returns the outcome: 'resolved' with the payload, 'waiting'
-- with the due time, or 'lost' when the lease is no longer this invocation's.
CREATE FUNCTION {schema}.register_wait(
    p_run uuid, p_token uuid, p_key text, p_position integer, p_name text,
    p_kind text, p_event text, p_paths text[], p_match_values jsonb, p_match json,
    p_containment jsonb, p_token_id text, p_lookback timestamptz,
    p_expires timestamptz, p_started timestamptz)
    RETURNS TABLE (outcome text, payload text, event_id bigint, due_at timestamptz)
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    found_id bigint;
    found_payload json;
    hit boolean := false;
    input json := json_build_object('kind', p_kind, 'event', p_event, 'match', p_match,
                                    'token', p_token_id, 'timeout_at', p_expires);
BEGIN
    IF p_kind = 'event' THEN
        PERFORM {schema}.lock_wait_match(p_event, p_paths, p_match_values);
    ELSE
        PERFORM pg_advisory_xact_lock(hashtextextended('flowkeeper.token:' || p_token_id, 0));
    END IF;
    PERFORM 1 FROM {schema}.runs r
    WHERE r.id = p_run AND r.lease_token = p_token
      AND r.status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'lost'::text, NULL::text, NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    IF p_kind = 'event' THEN
        SELECT f.id, f.payload INTO found_id, found_payload
        FROM {schema}.lookback_event(p_run, p_event, p_paths, p_containment, p_lookback) f;
        hit := found_id IS NOT NULL;
    ELSE
        SELECT t.payload, true INTO found_payload, hit
        FROM {schema}.tokens t WHERE t.id = p_token_id AND t.completed_at IS NOT NULL;
        hit := coalesce(hit, false);
    END IF;
    INSERT INTO {schema}.waits (run_id, key, kind, event_name, paths, match_values, match,
                                token_id, lookback_since, expires_at, resolved_at,
                                resolved_event, outcome)
    VALUES (p_run, p_key, p_kind, p_event, p_paths, p_match_values, p_match, p_token_id,
            p_lookback, p_expires, CASE WHEN hit THEN {schema}.clock_now() END,
            found_id, CASE WHEN hit THEN p_kind END);
    INSERT INTO {schema}.steps (run_id, key, position, name, kind, status, input, output,
                                attempts, started_at, finished_at, wake_at)
    VALUES (p_run, p_key, p_position, p_name, 'wait',
            CASE WHEN hit THEN 'completed' ELSE 'waiting' END, input,
            CASE WHEN hit THEN coalesce(found_payload, 'null'::json) END, 1, p_started,
            CASE WHEN hit THEN {schema}.clock_now() END, p_expires);
    IF hit THEN
        RETURN QUERY SELECT 'resolved'::text, coalesce(found_payload::text, 'null'), found_id,
                            NULL::timestamptz;
        RETURN;
    END IF;
    UPDATE {schema}.runs r
    SET status = 'waiting', lease_token = NULL, executing = false, lost_attempts = 0,
        step_key = NULL, step_attempt = 0, due_at = p_expires,
        updated_at = {schema}.clock_now()
    WHERE r.id = p_run;
    RETURN QUERY SELECT 'waiting'::text, NULL::text, NULL::bigint, p_expires;
END
$$;

-- Make run p_run due for the wait just resolved: leased to the caller's push
-- for p_lease (returned), or left due now when p_lease is NULL.  A run that is
-- being dispatched already (its timeout came due) is left to that dispatch.
CREATE FUNCTION {schema}.wake_run(p_run uuid, p_lease interval) RETURNS uuid
    LANGUAGE sql AS $$
    UPDATE {schema}.runs
    SET lease_token = CASE WHEN p_lease IS NULL THEN NULL ELSE gen_random_uuid() END,
        due_at = {schema}.clock_now() + coalesce(p_lease, interval '0'),
        updated_at = {schema}.clock_now()
    WHERE id = p_run AND status = 'waiting' AND lease_token IS NULL
    RETURNING lease_token
$$;

-- Send event p_name (exact JSON p_payload; dedup id p_key) and act on every
-- wait it satisfies: event waits are resolved with it and their runs woken,
-- cancel_on rules cancel their runs.  Returns one row 'sent' (or 'duplicate'
-- with the first event's id, acting on nothing), then a row per woken run
-- ('woken', with the push token when p_lease is given) and per cancelled run.
CREATE FUNCTION {schema}.send_event(
    p_name text, p_key text, p_payload json, p_run uuid, p_lease interval)
    RETURNS TABLE (kind text, event_id bigint, run_id uuid, lease uuid)
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    eid bigint;
    d jsonb := p_payload::jsonb;
    shape text[];
    vals jsonb;
    w record;
BEGIN
    PERFORM pg_advisory_xact_lock_shared({schema}.event_lock(p_name));
    INSERT INTO {schema}.event_log (name, event_key, payload, data, sent_by_run)
    VALUES (p_name, p_key, p_payload, d, p_run)
    ON CONFLICT (event_key) DO NOTHING
    RETURNING id INTO eid;
    IF eid IS NULL THEN
        RETURN QUERY SELECT 'duplicate'::text, e.id, NULL::uuid, NULL::uuid
                     FROM {schema}.event_log e WHERE e.event_key = p_key;
        RETURN;
    END IF;
    RETURN QUERY SELECT 'sent'::text, eid, NULL::uuid, NULL::uuid;
    -- Every match lock first, in one order, and only then any row: a send
    -- never waits for a lock while it holds a row another transaction needs.
    PERFORM pg_advisory_xact_lock(k.key)
    FROM (SELECT DISTINCT {schema}.match_lock(p_name, s.paths,
                                               {schema}.match_values(d, s.paths)) AS key
          FROM {schema}.wait_shapes s WHERE s.event_name = p_name) AS k
    ORDER BY k.key;
    FOR shape IN SELECT s.paths FROM {schema}.wait_shapes s WHERE s.event_name = p_name LOOP
        vals := {schema}.match_values(d, shape);
        FOR w IN
            UPDATE {schema}.waits x
            SET resolved_at = {schema}.clock_now(), resolved_event = eid,
                outcome = CASE WHEN x.kind = 'cancel' THEN 'cancelled' ELSE 'event' END
            WHERE x.event_name = p_name AND x.paths = shape AND x.match_values = vals
              AND x.resolved_at IS NULL
              AND EXISTS (SELECT 1 FROM {schema}.runs r WHERE r.id = x.run_id
                          AND r.status IN ('queued', 'running', 'sleeping', 'retrying',
                                           'waiting'))
            RETURNING x.run_id AS rid, x.key AS wkey, x.kind AS wkind
        LOOP
            IF w.wkind = 'event' THEN
                UPDATE {schema}.steps
                SET status = 'completed', output = p_payload, finished_at = {schema}.clock_now()
                WHERE steps.run_id = w.rid AND steps.key = w.wkey AND steps.status = 'waiting';
                RETURN QUERY SELECT 'woken'::text, eid, w.rid, {schema}.wake_run(w.rid, p_lease);
            ELSE
                RETURN QUERY SELECT 'cancelled'::text, eid, c.rid, NULL::uuid
                             FROM {schema}.cancel_by_event(w.rid, eid, p_name) AS c(rid);
            END IF;
        END LOOP;
    END LOOP;
END
$$;

-- Cancel run p_run because event p_event matched one of its cancel_on rules,
-- as cancel_run does (an invocation executing a step keeps its lease until it
-- stopped it).  Returns the run id when it was live.
CREATE FUNCTION {schema}.cancel_by_event(p_run uuid, p_event bigint, p_name text)
    RETURNS SETOF uuid
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    stopping boolean;
BEGIN
    UPDATE {schema}.runs
    SET status = 'cancelled',
        lease_token = CASE WHEN executing AND due_at > {schema}.clock_now()
                           THEN lease_token END,
        due_at = CASE WHEN executing AND due_at > {schema}.clock_now() THEN due_at END,
        finished_at = {schema}.clock_now(), updated_at = {schema}.clock_now()
    WHERE id = p_run AND status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')
    RETURNING lease_token IS NOT NULL INTO stopping;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE {schema}.waits SET resolved_at = {schema}.clock_now(), outcome = 'cancelled'
    WHERE run_id = p_run AND resolved_at IS NULL;
    INSERT INTO {schema}.events (run_id, kind, detail)
    VALUES (p_run, 'cancelled', jsonb_build_object(
        'reason', 'cancel_on: event ' || p_name, 'event_id', p_event, 'by', 'event')
        || CASE WHEN stopping THEN '{"stopping": true}'::jsonb ELSE '{}'::jsonb END);
    RETURN NEXT p_run;
END
$$;

-- A recorded wait that was still waiting when this invocation (lease p_token)
-- claimed run p_run: under the locks a send or a token completion takes, say
-- whether it was resolved meanwhile ('completed' with the payload), else time
-- it out when p_time_up ('timed_out'), else let the run wait again until the
-- wait's timeout ('waiting').  'lost' when the lease is no longer this one's.
CREATE FUNCTION {schema}.resume_wait(p_run uuid, p_token uuid, p_key text, p_time_up boolean)
    RETURNS TABLE (status text, payload text)
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    w record;
    s record;
BEGIN
    SELECT * INTO w FROM {schema}.waits x WHERE x.run_id = p_run AND x.key = p_key;
    IF w.token_id IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('flowkeeper.token:' || w.token_id, 0));
    ELSIF w.event_name IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock_shared({schema}.event_lock(w.event_name));
        PERFORM pg_advisory_xact_lock(
            {schema}.match_lock(w.event_name, w.paths, w.match_values));
    END IF;
    PERFORM 1 FROM {schema}.runs r WHERE r.id = p_run AND r.lease_token = p_token
      AND r.status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting');
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'lost'::text, NULL::text;
        RETURN;
    END IF;
    SELECT * INTO s FROM {schema}.steps x WHERE x.run_id = p_run AND x.key = p_key;
    IF s.status IN ('completed', 'timed_out') THEN
        RETURN QUERY SELECT s.status, s.output::text;
        RETURN;
    END IF;
    IF p_time_up THEN
        UPDATE {schema}.waits x SET resolved_at = {schema}.clock_now(), outcome = 'timed_out'
        WHERE x.run_id = p_run AND x.key = p_key AND x.resolved_at IS NULL;
        UPDATE {schema}.steps x SET status = 'timed_out', finished_at = {schema}.clock_now()
        WHERE x.run_id = p_run AND x.key = p_key;
        RETURN QUERY SELECT 'timed_out'::text, NULL::text;
        RETURN;
    END IF;
    UPDATE {schema}.runs r
    SET status = 'waiting', lease_token = NULL, executing = false, lost_attempts = 0,
        step_key = NULL, step_attempt = 0, due_at = s.wake_at,
        updated_at = {schema}.clock_now()
    WHERE r.id = p_run;
    RETURN QUERY SELECT 'waiting'::text, NULL::text;
END
$$;

-- Complete approval token p_id with p_payload: once, before it expires.
-- Returns 'completed' (with the woken run's push token), 'already_completed',
-- 'expired' or 'not_found'.
CREATE FUNCTION {schema}.complete_token(p_id text, p_payload json, p_lease interval)
    RETURNS TABLE (outcome text, run_id uuid, lease uuid)
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t record;
    w record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('flowkeeper.token:' || p_id, 0));
    SELECT * INTO t FROM {schema}.tokens WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::uuid, NULL::uuid;
        RETURN;
    END IF;
    IF t.completed_at IS NOT NULL THEN
        RETURN QUERY SELECT 'already_completed'::text, t.run_id, NULL::uuid;
        RETURN;
    END IF;
    IF t.expires_at IS NOT NULL AND t.expires_at <= {schema}.clock_now() THEN
        RETURN QUERY SELECT 'expired'::text, t.run_id, NULL::uuid;
        RETURN;
    END IF;
    UPDATE {schema}.tokens SET completed_at = {schema}.clock_now(), payload = p_payload
    WHERE id = p_id;
    FOR w IN
        UPDATE {schema}.waits x SET resolved_at = {schema}.clock_now(), outcome = 'token'
        WHERE x.token_id = p_id AND x.resolved_at IS NULL
        RETURNING x.run_id AS rid, x.key AS wkey
    LOOP
        UPDATE {schema}.steps
        SET status = 'completed', output = p_payload, finished_at = {schema}.clock_now()
        WHERE steps.run_id = w.rid AND steps.key = w.wkey AND steps.status = 'waiting';
        RETURN QUERY SELECT 'completed'::text, w.rid, {schema}.wake_run(w.rid, p_lease);
        RETURN;
    END LOOP;
    RETURN QUERY SELECT 'completed'::text, t.run_id, NULL::uuid;
END
$$;

-- Register cancel_on rule p_key of run p_run (under lease p_token), once: an
-- event that matches it and was sent since p_since (the run's creation)
-- cancels the run at once.  Returns 'registered', 'exists', 'cancelled' or
-- 'lost'.
CREATE FUNCTION {schema}.register_cancel_rule(
    p_run uuid, p_token uuid, p_key text, p_event text, p_paths text[],
    p_match_values jsonb, p_match json, p_containment jsonb, p_since timestamptz)
    RETURNS text
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    found_id bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM {schema}.waits x WHERE x.run_id = p_run AND x.key = p_key) THEN
        RETURN 'exists';
    END IF;
    PERFORM {schema}.lock_wait_match(p_event, p_paths, p_match_values);
    PERFORM 1 FROM {schema}.runs r
    WHERE r.id = p_run AND r.lease_token = p_token
      AND r.status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting');
    IF NOT FOUND THEN
        RETURN 'lost';
    END IF;
    SELECT f.id INTO found_id
    FROM {schema}.lookback_event(p_run, p_event, p_paths, p_containment, p_since) f;
    INSERT INTO {schema}.waits (run_id, key, kind, event_name, paths, match_values, match,
                                lookback_since, resolved_at, resolved_event, outcome)
    VALUES (p_run, p_key, 'cancel', p_event, p_paths, p_match_values, p_match, p_since,
            CASE WHEN found_id IS NOT NULL THEN {schema}.clock_now() END, found_id,
            CASE WHEN found_id IS NOT NULL THEN 'cancelled' END)
    ON CONFLICT DO NOTHING;
    IF found_id IS NOT NULL THEN
        PERFORM {schema}.cancel_by_event(p_run, found_id, p_event);
        RETURN 'cancelled';
    END IF;
    RETURN 'registered';
END
$$;
