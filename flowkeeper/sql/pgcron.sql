-- Dispatching due runs from inside Postgres, for `flowkeeper pgcron install`.
-- "{schema}" is replaced by the configured schema name.  Each block starts
-- with "-- name: <name>"; install runs "core" and then "pg_net" or "plpython"
-- (a PL/Python function can only be created where the language exists).
--
-- pg_cron runs `CALL {schema}.pgcron_tick()`.  The tick claims due runs with
-- the same lease semantics as the Python scheduler (FOR UPDATE SKIP LOCKED, a
-- fresh lease token, due_at = now + dispatch_lease) and posts one signed
-- invocation per run to the endpoint, which answers 202 once it has claimed
-- the run and goes on by itself.  The signature is computed here, in SQL, with
-- the algorithm documented in flowkeeper/signing.py (pinned by
-- tests/vectors/signing.json), from core SQL only (sha256(), PostgreSQL 11+).
--
-- Secrets: the endpoint and the *derived* signing key
-- (HMAC-SHA256(secret, "flowkeeper.v1"), the key itsdangerous signs with) live
-- in {schema}.pgcron_settings, readable only by its owner (the role that ran
-- install) and superusers; the cron job's command names no secret.

-- name: core
DROP TABLE IF EXISTS {schema}.pgcron_settings;
CREATE TABLE {schema}.pgcron_settings (
    id               boolean PRIMARY KEY DEFAULT true CHECK (id),
    invoke_url       text NOT NULL,     -- the endpoint URL + "/"
    invoke_path      text NOT NULL,     -- the path signed (as the Python dispatcher signs it)
    signing_key      bytea NOT NULL,    -- derived key, see above
    transport        text NOT NULL CHECK (transport IN ('pg_net', 'plpython')),
    dispatch_lease   interval NOT NULL,
    max_runs         integer NOT NULL,
    batch_size       integer NOT NULL,
    concurrency      integer NOT NULL,
    http_timeout_ms  integer NOT NULL,
    time_limit       interval NOT NULL,
    job_name         text NOT NULL,
    schedule         text NOT NULL,
    sql_digest       text NOT NULL,     -- which pgcron.sql built these objects
    installed_at     timestamptz NOT NULL DEFAULT now(),
    installed_by     text NOT NULL DEFAULT current_user,
    last_tick        jsonb              -- what the last tick did, for `pgcron status`
);
REVOKE ALL ON {schema}.pgcron_settings FROM PUBLIC;

-- Requests handed to pg_net and not yet looked at: the next tick reads their
-- responses and backs off the runs whose invocation failed.
CREATE TABLE IF NOT EXISTS {schema}.pgcron_requests (
    request_id  bigint PRIMARY KEY,
    run_id      uuid NOT NULL,
    lease_token uuid NOT NULL,
    sent_at     timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON {schema}.pgcron_requests FROM PUBLIC;

-- base64url without padding, as itsdangerous encodes.
CREATE OR REPLACE FUNCTION {schema}.fk_b64url(data bytea) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT rtrim(translate(encode(data, 'base64'), E'+/\n', '-_'), '=') $$;

-- HMAC-SHA256 (RFC 2104) from core sha256(): the key's inner and outer pads,
-- computed once per tick, then two hashes per signature.
CREATE OR REPLACE FUNCTION {schema}.fk_hmac_pads(key bytea) RETURNS bytea[]
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
DECLARE
    k bytea := CASE WHEN length(key) > 64 THEN sha256(key) ELSE key END;
    inner_pad bytea;
    outer_pad bytea;
BEGIN
    k := k || decode(repeat('00', 64 - length(k)), 'hex');
    inner_pad := k;
    outer_pad := k;
    FOR i IN 0..63 LOOP
        inner_pad := set_byte(inner_pad, i, get_byte(k, i) # 54);   -- 0x36
        outer_pad := set_byte(outer_pad, i, get_byte(k, i) # 92);   -- 0x5c
    END LOOP;
    RETURN ARRAY[inner_pad, outer_pad];
END
$$;

CREATE OR REPLACE FUNCTION {schema}.fk_hmac(pads bytea[], message bytea) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT sha256(pads[2] || sha256(pads[1] || message)) $$;

-- The key itsdangerous signs with: HMAC-SHA256(secret, "flowkeeper.v1").
CREATE OR REPLACE FUNCTION {schema}.fk_derive_key(secret bytea) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT {schema}.fk_hmac({schema}.fk_hmac_pads(secret), convert_to('flowkeeper.v1', 'UTF8')) $$;

-- The Flowkeeper-Signature header value for a request, given the pads of the
-- derived key and the unix time in seconds:
--   ts  = base64url(seconds as big-endian bytes, minimal length)
--   sig = base64url(HMAC(derived, "v1\n" METHOD "\n" path "\n" hex(sha256(body)) "." ts))
CREATE OR REPLACE FUNCTION {schema}.fk_signature(
    pads bytea[], method text, path text, body bytea, unix_seconds bigint
) RETURNS text
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
DECLARE
    ts_bytes bytea := int8send(unix_seconds);
    ts text;
BEGIN
    WHILE length(ts_bytes) > 1 AND get_byte(ts_bytes, 0) = 0 LOOP
        ts_bytes := substring(ts_bytes FROM 2);
    END LOOP;
    ts := {schema}.fk_b64url(ts_bytes);
    RETURN ts || '.' || {schema}.fk_b64url({schema}.fk_hmac(pads, convert_to(
        'v1' || E'\n' || upper(method) || E'\n' || path || E'\n'
        || encode(sha256(body), 'hex') || '.' || ts, 'UTF8')));
END
$$;

-- Convenience for checks: sign with the raw secret.
CREATE OR REPLACE FUNCTION {schema}.fk_sign(
    secret text, method text, path text, body bytea, unix_seconds bigint
) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
    SELECT {schema}.fk_signature(
        {schema}.fk_hmac_pads({schema}.fk_derive_key(convert_to(secret, 'UTF8'))),
        method, path, body, unix_seconds)
$$;

-- The scheduler's claim, exactly as the Python tick's claim_due query.
CREATE OR REPLACE FUNCTION {schema}.pgcron_claim(n integer, lease interval)
    RETURNS TABLE (id uuid, lease_token uuid)
    LANGUAGE sql
    AS $$
    WITH due AS (
        SELECT r.id FROM {schema}.runs r
        WHERE r.due_at <= {schema}.clock_now()
        ORDER BY r.due_at
        LIMIT n
        FOR UPDATE SKIP LOCKED
    )
    UPDATE {schema}.runs r
    SET lease_token = gen_random_uuid(),
        due_at = {schema}.clock_now() + lease
    FROM due
    WHERE r.id = due.id
    RETURNING r.id, r.lease_token
$$;

-- Why an invocation did not get through, or NULL when it did: the same rules
-- as the Python dispatcher.  A timeout means the request was sent and the
-- endpoint is busy with it (or died: the lease expires and the run comes back).
CREATE OR REPLACE FUNCTION {schema}.pgcron_failure(
    status integer, timed_out boolean, error text, content text
) RETURNS text
    LANGUAGE plpgsql IMMUTABLE
    AS $$
DECLARE
    answer jsonb;
    code text;
BEGIN
    IF coalesce(timed_out, false) THEN
        RETURN NULL;
    END IF;
    IF status IS NULL THEN
        RETURN coalesce(nullif(error, ''), 'no response');
    END IF;
    BEGIN
        answer := content::jsonb;
    EXCEPTION WHEN others THEN
        answer := NULL;
    END;
    IF jsonb_typeof(answer) = 'object' THEN
        code := answer -> 'error' ->> 'code';
        IF status IN (200, 202) AND answer ? 'run_id' THEN
            RETURN NULL;
        END IF;
        IF status = 404 AND code IN ('run_not_found', 'unknown_workflow') THEN
            RETURN NULL;
        END IF;
        IF code IS NOT NULL THEN
            RETURN 'HTTP ' || status || ': ' || coalesce(answer -> 'error' ->> 'message', code);
        END IF;
    END IF;
    IF status >= 500 THEN
        RETURN 'HTTP ' || status || ': '
            || coalesce(nullif(left(regexp_replace(coalesce(content, ''), '\s+', ' ', 'g'), 200), ''),
                        'empty body');
    END IF;
    RETURN 'HTTP ' || status || ' from an address that does not answer as a flowkeeper endpoint'
        || ' (check the endpoint given to flowkeeper pgcron install)';
END
$$;

-- Back off runs whose invocation failed, as the Python tick does: due again
-- after 2^failures seconds (at most 300, jittered), counted, and recorded as
-- a 'dispatch_failed' event on the 1st, 2nd, 4th, 8th... failure in a row.
CREATE OR REPLACE FUNCTION {schema}.pgcron_failed(ids uuid[], tokens uuid[], reasons text[])
    RETURNS integer
    LANGUAGE sql
    AS $$
    WITH f AS (
        SELECT * FROM unnest(ids, tokens, reasons) AS f(id, token, reason)
    ), r AS (
        UPDATE {schema}.runs r
        SET lease_token = NULL,
            due_at = {schema}.clock_now() + make_interval(secs =>
                least(300, 2 ^ least(r.dispatch_failures + 1, 16)) * (0.8 + 0.4 * random())),
            dispatch_failures = r.dispatch_failures + 1
        FROM f
        WHERE r.id = f.id AND r.lease_token = f.token
        RETURNING r.id, r.dispatch_failures, r.due_at, f.reason
    ), e AS (
        INSERT INTO {schema}.events (run_id, kind, detail)
        SELECT id, 'dispatch_failed', jsonb_build_object(
                   'reason', reason, 'failures', dispatch_failures, 'via', 'pg_cron',
                   'retry_in', round(extract(epoch FROM due_at - {schema}.clock_now()), 3))
        FROM r
        WHERE dispatch_failures & (dispatch_failures - 1) = 0
    )
    SELECT count(*)::integer FROM r
$$;

-- The job pg_cron runs.  A procedure, so that with PL/Python it can commit its
-- claims before sending: the endpoint's claim must see this tick's tokens.
CREATE OR REPLACE PROCEDURE {schema}.pgcron_tick()
    LANGUAGE plpgsql
    AS $$
DECLARE
    s {schema}.pgcron_settings;
    pads bytea[];
    started timestamptz := clock_timestamp();
    total integer := 0;
    sent integer := 0;
    failed integer := 0;
    want integer;
    ids uuid[];
    tokens uuid[];
    bodies text[];
    signatures text[];
    f_ids uuid[];
    f_tokens uuid[];
    f_reasons text[];
    last_error text;
BEGIN
    SELECT * INTO s FROM {schema}.pgcron_settings;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'flowkeeper: pg_cron dispatch is not configured for schema {schema}'
            USING HINT = 'Run `flowkeeper pgcron install`, or `flowkeeper pgcron uninstall` '
                         'to remove the job.';
    END IF;
    pads := {schema}.fk_hmac_pads(s.signing_key);

    IF s.transport = 'pg_net' THEN
        -- pg_net sends after this transaction commits, from its own worker:
        -- claims, requests and their bookkeeping commit together.
        failed := {schema}.pgcron_reconcile();
        WITH c AS (
            SELECT * FROM {schema}.pgcron_claim(s.max_runs, s.dispatch_lease)
        ), b AS (
            SELECT c.id, c.lease_token,
                   jsonb_build_object('run_id', c.id, 'lease', c.lease_token) AS body
            FROM c
        ), q AS (
            INSERT INTO {schema}.pgcron_requests (request_id, run_id, lease_token)
            SELECT net.http_post(
                       url := s.invoke_url,
                       body := b.body,
                       -- pg_net sends convert_to(body::text, 'UTF8'): sign those bytes.
                       headers := jsonb_build_object(
                           'Content-Type', 'application/json',
                           'User-Agent', 'flowkeeper-pgcron',
                           'Flowkeeper-Signature', {schema}.fk_signature(
                               pads, 'POST', s.invoke_path, convert_to(b.body::text, 'UTF8'),
                               extract(epoch FROM clock_timestamp())::bigint)),
                       timeout_milliseconds := s.http_timeout_ms),
                   b.id, b.lease_token
            FROM b
            RETURNING 1
        )
        SELECT count(*) INTO total FROM q;
        sent := total;
    ELSE
        LOOP
            want := least(s.batch_size, s.max_runs - total);
            EXIT WHEN want <= 0;
            SELECT array_agg(c.id), array_agg(c.lease_token) INTO ids, tokens
            FROM {schema}.pgcron_claim(want, s.dispatch_lease) c;
            EXIT WHEN ids IS NULL;
            COMMIT;
            total := total + cardinality(ids);
            SELECT array_agg(x.body ORDER BY x.i),
                   array_agg({schema}.fk_signature(
                       pads, 'POST', s.invoke_path, convert_to(x.body, 'UTF8'),
                       extract(epoch FROM clock_timestamp())::bigint) ORDER BY x.i)
            INTO bodies, signatures
            FROM (SELECT i, '{"run_id":"' || ids[i] || '","lease":"' || tokens[i] || '"}' AS body
                  FROM generate_subscripts(ids, 1) AS i) x;
            SELECT array_agg(ids[r.i]), array_agg(tokens[r.i]), array_agg(r.reason)
            INTO f_ids, f_tokens, f_reasons
            FROM (SELECT p.i, {schema}.pgcron_failure(p.status, p.timed_out, p.error, p.content)
                             AS reason
                  FROM {schema}.pgcron_http_post(s.invoke_url, bodies, signatures,
                                                 s.http_timeout_ms, s.concurrency) p) r
            WHERE r.reason IS NOT NULL;
            IF f_ids IS NOT NULL THEN
                PERFORM {schema}.pgcron_failed(f_ids, f_tokens, f_reasons);
                failed := failed + cardinality(f_ids);
                last_error := f_reasons[1];
                RAISE WARNING 'flowkeeper: % of % invocation(s) to % failed (%); retried with backoff',
                    cardinality(f_ids), cardinality(ids), s.invoke_url, last_error;
            END IF;
            sent := sent + cardinality(ids) - coalesce(cardinality(f_ids), 0);
            COMMIT;
            -- Stop when nothing more is due, when the endpoint failed a whole
            -- batch (it is down: back off rather than fail every due run), or
            -- before the next cron run would queue behind this one.
            EXIT WHEN cardinality(ids) < want
                   OR coalesce(cardinality(f_ids), 0) = cardinality(ids)
                   OR clock_timestamp() - started > s.time_limit;
        END LOOP;
    END IF;

    -- Runs parked on a concurrency key that has a free slot (a woken run was
    -- cancelled before it started, say) are woken: a safety net, see flow_sweep.
    PERFORM {schema}.flow_sweep(100);
    -- Finished runs past their retention: one small batch per policy (0010).
    PERFORM {schema}.prune_runs(200);

    -- Failure alerts whose first delivery failed are retried by the endpoint's
    -- own tick (the alerts module needs Python: webhooks, on_failure hooks), and
    -- cron slots are fired there (cron expressions are evaluated in Python), so
    -- when some are due, ask it for one.  One small signed POST, only then.
    IF EXISTS (SELECT 1 FROM {schema}.alerts WHERE due_at <= {schema}.clock_now())
       OR EXISTS (SELECT 1 FROM {schema}.schedules
                  WHERE next_at <= {schema}.clock_now() AND NOT paused AND removed_at IS NULL)
    THEN
        DECLARE
            tick_url text := regexp_replace(s.invoke_url, '/$', '') || '/tick';
            tick_sig text := {schema}.fk_signature(
                pads, 'POST', regexp_replace(s.invoke_path, '/$', '') || '/tick',
                convert_to('{}', 'UTF8'), extract(epoch FROM clock_timestamp())::bigint);
        BEGIN
            IF s.transport = 'pg_net' THEN
                PERFORM net.http_post(
                    url := tick_url,
                    body := '{}'::jsonb,
                    headers := jsonb_build_object(
                        'Content-Type', 'application/json',
                        'User-Agent', 'flowkeeper-pgcron',
                        'Flowkeeper-Signature', tick_sig),
                    timeout_milliseconds := s.http_timeout_ms);
            ELSE
                PERFORM 1 FROM {schema}.pgcron_http_post(
                    tick_url, ARRAY['{}'], ARRAY[tick_sig], s.http_timeout_ms, 1);
            END IF;
        END;
    END IF;

    UPDATE {schema}.pgcron_settings
    SET last_tick = jsonb_build_object(
        'at', started, 'seconds', round(extract(epoch FROM clock_timestamp() - started), 3),
        'claimed', total, 'sent', sent, 'failed', failed, 'last_error', last_error);
END
$$;

-- Only the installing role runs the job or its pieces (they lease and back off runs).
REVOKE ALL ON PROCEDURE {schema}.pgcron_tick() FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.pgcron_claim(integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.pgcron_failed(uuid[], uuid[], text[]) FROM PUBLIC;

-- name: pg_net
-- Read pg_net's responses to earlier ticks' requests: back off the runs whose
-- invocation failed, forget the rest.  Returns how many failed.
CREATE OR REPLACE FUNCTION {schema}.pgcron_reconcile() RETURNS integer
    LANGUAGE plpgsql
    AS $$
DECLARE
    f_ids uuid[];
    f_tokens uuid[];
    f_reasons text[];
BEGIN
    WITH done AS (
        DELETE FROM {schema}.pgcron_requests q
        USING net._http_response r
        WHERE r.id = q.request_id
        RETURNING q.run_id, q.lease_token,
                  {schema}.pgcron_failure(r.status_code, r.timed_out, r.error_msg, r.content)
                      AS reason
    )
    SELECT array_agg(run_id), array_agg(lease_token), array_agg(reason)
    INTO f_ids, f_tokens, f_reasons
    FROM done WHERE reason IS NOT NULL;
    -- pg_net keeps responses for pg_net.ttl (6 hours): anything older is lost.
    DELETE FROM {schema}.pgcron_requests WHERE sent_at < now() - interval '6 hours';
    IF f_ids IS NULL THEN
        RETURN 0;
    END IF;
    RAISE WARNING 'flowkeeper: % invocation(s) sent through pg_net failed (%); retried with backoff',
        cardinality(f_ids), f_reasons[1];
    RETURN {schema}.pgcron_failed(f_ids, f_tokens, f_reasons);
END
$$;

REVOKE ALL ON FUNCTION {schema}.pgcron_reconcile() FROM PUBLIC;

-- name: plpython
-- POST each body to the endpoint, `concurrency` at a time, waiting at most
-- `timeout_ms` for the answer: the endpoint answers 202 once it has claimed
-- the run, so a timeout means "sent, still busy" and counts as delivered.
-- Threads only wait on sockets; they never call into Postgres, and block all
-- signals so that Postgres keeps handling them in its own thread.
CREATE OR REPLACE FUNCTION {schema}.pgcron_http_post(
    url text, bodies text[], signatures text[], timeout_ms integer, concurrency integer
) RETURNS TABLE (i integer, status integer, timed_out boolean, error text, content text)
    LANGUAGE plpython3u
    AS $$
import concurrent.futures
import http.client
import signal
import socket
import ssl
import threading
import urllib.parse

parts = urllib.parse.urlsplit(url)
secure = parts.scheme == "https"
port = parts.port or (443 if secure else 80)
target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
timeout = timeout_ms / 1000.0
context = ssl.create_default_context() if secure else None
local = threading.local()
opened = []
lock = threading.Lock()


def quiet_signals():
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


def connection(fresh):
    conn = getattr(local, "conn", None)
    if conn is None or fresh:
        if conn is not None:
            conn.close()
        if secure:
            conn = http.client.HTTPSConnection(parts.hostname, port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
        local.conn = conn
        with lock:
            opened.append(conn)
    return conn


def post(index):
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "flowkeeper-pgcron",
        "Flowkeeper-Signature": signatures[index],
    }
    for attempt in (0, 1):
        conn = connection(fresh=attempt == 1)
        reused = conn.sock is not None
        if not reused:
            try:
                conn.connect()
            except socket.timeout:
                return (index + 1, None, False, "connect timeout after %gs" % timeout, None)
            except OSError as exc:
                return (index + 1, None, False, "%s: %s" % (type(exc).__name__, exc), None)
        try:
            conn.request("POST", target, body=bodies[index].encode("utf-8"), headers=headers)
            response = conn.getresponse()
            content = response.read().decode("utf-8", "replace")
            if response.will_close:
                conn.close()
            return (index + 1, response.status, False, None, content)
        except socket.timeout:
            conn.close()
            return (index + 1, None, True, None, None)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if reused and attempt == 0:
                continue  # a kept-alive connection the server had closed: once more, fresh
            return (index + 1, None, False, "%s: %s" % (type(exc).__name__, exc), None)


workers = max(1, min(concurrency, len(bodies)))
try:
    with concurrent.futures.ThreadPoolExecutor(workers, initializer=quiet_signals) as pool:
        results = list(pool.map(post, range(len(bodies))))
finally:
    for conn in opened:
        conn.close()
return results
$$;

REVOKE ALL ON FUNCTION {schema}.pgcron_http_post(text, text[], text[], integer, integer)
    FROM PUBLIC;

-- name: uninstall
DROP PROCEDURE IF EXISTS {schema}.pgcron_tick();
DROP FUNCTION IF EXISTS {schema}.pgcron_reconcile();
DROP FUNCTION IF EXISTS {schema}.pgcron_http_post(text, text[], text[], integer, integer);
DROP FUNCTION IF EXISTS {schema}.pgcron_failed(uuid[], uuid[], text[]);
DROP FUNCTION IF EXISTS {schema}.pgcron_failure(integer, boolean, text, text);
DROP FUNCTION IF EXISTS {schema}.pgcron_claim(integer, interval);
DROP FUNCTION IF EXISTS {schema}.fk_sign(text, text, text, bytea, bigint);
DROP FUNCTION IF EXISTS {schema}.fk_signature(bytea[], text, text, bytea, bigint);
DROP FUNCTION IF EXISTS {schema}.fk_derive_key(bytea);
DROP FUNCTION IF EXISTS {schema}.fk_hmac(bytea[], bytea);
DROP FUNCTION IF EXISTS {schema}.fk_hmac_pads(bytea);
DROP FUNCTION IF EXISTS {schema}.fk_b64url(bytea);
DROP TABLE IF EXISTS {schema}.pgcron_requests;
DROP TABLE IF EXISTS {schema}.pgcron_settings;
