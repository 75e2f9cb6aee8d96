-- flowkeeper schema, version 27: a run's input is not sent back by the
-- statement that creates it, nor collected on the way into its row.
--
-- The endpoint creates the runs trigger() hands it (create_claimed_run and,
-- for flow-controlled runs, create_gated) and got each run's input back, a
-- copy of the text it had just sent.  A statement that writes keeps its
-- whole answer before sending it, and PL/pgSQL's RETURN QUERY collects its
-- rows likewise: in memory up to work_mem, past it in a temporary file.  On
-- a server that limits temporary files (temp_file_limit), a run with an
-- input larger than work_mem could not be created at all; a batch of creates
-- also read its inputs from unnest(...) in FROM, which collects every row
-- first (as migration 26 says of step values).  The new functions below are
-- create_gated and create_gated_batch without the input in their answer, the
-- batch's inputs unnested in a select list (each goes straight on to the
-- insert, in order).  The library keeps the text it sent.
-- tests/integration/test_payload_storage.py creates, runs and resumes such
-- runs with temp_file_limit = 0 and work_mem = 1MB.
--
-- Additive: create_gated and create_gated_batch keep their signatures and
-- answers for a library at version 26, now by calling the lean functions
-- and reading each claimed run's input after them (a statement of its own,
-- which sees the rows they inserted).
--
-- The flow-control functions run with enable_seqscan off (migration 21;
-- tests/integration/test_flow_plans.py): CREATE OR REPLACE drops the
-- setting, so each function here says it again.

CREATE FUNCTION {schema}.create_gated_lean(
    p_id uuid, p_workflow text, p_input json, p_key text, p_token uuid, p_lease interval,
    p_flow_keys text[], p_flow_limits integer[], p_priority integer, p_timeout interval,
    p_start_timeout interval, p_rate_keys text[], p_rate_spacing interval[],
    p_code_version text)
    RETURNS TABLE (outcome text, id uuid, workflow text, step_key text,
                   step_attempt integer, invocations integer, lost_attempts integer,
                   created_at timestamptz, parent_id uuid, db_now timestamptz)
    LANGUAGE plpgsql
    SET enable_seqscan = off
    AS $$
#variable_conflict use_column
DECLARE
    i integer;
    room boolean := true;
BEGIN
    IF p_flow_keys IS NOT NULL AND p_rate_keys IS NULL AND p_lease > interval '0' THEN
        PERFORM {schema}.flow_lock(p_flow_keys);
        FOR i IN 1 .. array_length(p_flow_keys, 1) LOOP
            IF {schema}.flow_held(p_flow_keys[i], p_id) >= p_flow_limits[i] THEN
                room := false;
                EXIT;
            END IF;
        END LOOP;
        IF room THEN
            RETURN QUERY
            WITH r AS (
                INSERT INTO {schema}.runs AS r (id, workflow, status, input, idempotency_key,
                                                lease_token, due_at, started_at, invocations,
                                                executing, flow_keys, flow_limits, priority,
                                                deadline, start_deadline, code_version)
                VALUES (p_id, p_workflow, 'running', p_input, p_key, p_token,
                        {schema}.clock_now() + p_lease, {schema}.clock_now(), 1, true,
                        p_flow_keys, p_flow_limits, p_priority,
                        {schema}.clock_now() + p_timeout,
                        {schema}.clock_now() + p_start_timeout, p_code_version)
                ON CONFLICT DO NOTHING
                RETURNING r.id, r.workflow, r.step_key, r.step_attempt,
                          r.invocations, r.lost_attempts, r.created_at, r.parent_id
            ), s AS (
                INSERT INTO {schema}.slots (key, run_id)
                SELECT DISTINCT u.k, r.id FROM r, unnest(p_flow_keys) AS u(k)
            )
            SELECT 'claimed'::text, r.id, r.workflow, r.step_key, r.step_attempt,
                   r.invocations, r.lost_attempts, r.created_at, r.parent_id,
                   {schema}.clock_now()
            FROM r;
            IF NOT FOUND THEN  -- the same id created before, or the idempotency key taken
                RETURN QUERY SELECT 'conflict'::text, NULL::uuid, NULL::text, NULL::text,
                                    NULL::integer, NULL::integer, NULL::integer,
                                    NULL::timestamptz, NULL::uuid, NULL::timestamptz;
            END IF;
            RETURN;
        END IF;
    END IF;
    INSERT INTO {schema}.runs (id, workflow, status, input, idempotency_key, lease_token,
                               due_at, flow_keys, flow_limits, priority, deadline,
                               start_deadline, rate_keys, rate_spacing, code_version)
    VALUES (p_id, p_workflow, 'queued', p_input, p_key, p_token,
            {schema}.clock_now() + p_lease
                - CASE WHEN p_lease > interval '0' THEN interval '0'
                       ELSE make_interval(mins => p_priority) END,
            p_flow_keys, p_flow_limits, p_priority,
            {schema}.clock_now() + p_timeout, {schema}.clock_now() + p_start_timeout,
            p_rate_keys, p_rate_spacing, p_code_version)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN  -- the same id created before, or the idempotency key taken
        RETURN QUERY SELECT 'conflict'::text, NULL::uuid, NULL::text, NULL::text,
                            NULL::integer, NULL::integer, NULL::integer, NULL::timestamptz,
                            NULL::uuid, NULL::timestamptz;
        RETURN;
    END IF;
    IF NOT {schema}.flow_gate(p_id, p_token) THEN
        RETURN QUERY SELECT 'gated'::text, p_id, NULL::text, NULL::text,
                            NULL::integer, NULL::integer, NULL::integer, NULL::timestamptz,
                            NULL::uuid, NULL::timestamptz;
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE {schema}.runs r
    SET status = 'running',
        due_at = {schema}.clock_now() + p_lease,
        started_at = {schema}.clock_now(),
        updated_at = {schema}.clock_now(),
        invocations = 1,
        executing = true
    WHERE r.id = p_id AND r.lease_token = p_token AND r.status = 'queued'
    RETURNING 'claimed'::text, r.id, r.workflow, r.step_key, r.step_attempt,
              r.invocations, r.lost_attempts, r.created_at, r.parent_id,
              {schema}.clock_now();
END
$$;

CREATE FUNCTION {schema}.create_gated_batch_lean(
    p_ids uuid[], p_workflows text[], p_inputs json[], p_keys text[], p_tokens uuid[],
    p_leases interval[], p_priorities integer[], p_timeouts interval[],
    p_start_timeouts interval[], p_code_versions text[], p_nkeys integer[],
    p_nlimits integer[], p_nrates integer[], p_nspacing integer[], p_flow_keys text[],
    p_flow_limits integer[], p_rate_keys text[], p_rate_spacing interval[],
    p_lock_runs uuid[], p_lock_keys text[], p_lock_rate_keys text[])
    RETURNS TABLE (ord integer, outcome text, id uuid, workflow text,
                   step_key text, step_attempt integer, invocations integer,
                   lost_attempts integer, created_at timestamptz, parent_id uuid,
                   db_now timestamptz)
    LANGUAGE plpgsql
    SET enable_seqscan = off
    AS $$
#variable_conflict use_column
DECLARE
    n integer := coalesce(array_length(p_ids, 1), 0);
    i integer;
    ok integer := 0;
    ol integer := 0;
    orr integer := 0;
    os integer := 0;
    room boolean;
    offs integer[];
BEGIN
    -- The batch's prelock (migration 0019), when this is its first statement.
    IF p_lock_runs IS NOT NULL THEN
        PERFORM {schema}.flow_prelock(p_lock_runs, p_lock_keys, p_lock_rate_keys);
    END IF;
    -- The set path: every run has concurrency keys (as many as limits) and a
    -- lease, none has rate keys, and no id comes twice.
    room := n > 0
        AND coalesce(array_length(p_rate_keys, 1), 0) = 0
        AND (SELECT bool_and(u.nk >= 1 AND u.nk = u.nl AND u.nr IS NULL
                             AND u.lease > interval '0') IS TRUE
                    AND count(DISTINCT u.rid) = n
             FROM unnest(p_nkeys, p_nlimits, p_nrates, p_leases, p_ids)
                  AS u(nk, nl, nr, lease, rid));
    IF room THEN
        PERFORM {schema}.flow_lock(p_flow_keys);
        -- After the locks (a new snapshot): slots held now, per distinct key,
        -- plus every run of the batch that holds the key, within each run's
        -- limit for it (as version 20).
        WITH rk AS (
            SELECT f.k, f.lim, c.o
            FROM unnest(p_flow_keys, p_flow_limits) WITH ORDINALITY AS f(k, lim, at)
            JOIN (SELECT u.o, sum(u.nk) OVER (ORDER BY u.o) AS upto
                  FROM unnest(p_nkeys) WITH ORDINALITY AS u(nk, o)) AS c
              ON f.at <= c.upto AND f.at > c.upto - p_nkeys[c.o]
        ), need AS (
            SELECT rk.k, count(DISTINCT rk.o) AS runs, min(rk.lim) AS lim
            FROM rk GROUP BY rk.k
        )
        SELECT bool_and((SELECT count(*)
                         FROM {schema}.slots s
                         CROSS JOIN LATERAL (
                             SELECT 1 FROM {schema}.runs x
                             WHERE x.id = s.run_id AND x.executing
                               AND x.lease_token IS NOT NULL
                               AND x.due_at > {schema}.clock_now()
                             LIMIT 1) AS live
                         WHERE s.key = need.k) + need.runs <= need.lim) IS TRUE
        INTO room
        FROM need;
    END IF;
    IF room THEN
        -- Where each run's keys start in p_flow_keys (the running sum of the
        -- lengths before it): from the lengths alone, not the inputs.
        offs := ARRAY(SELECT (sum(u.nk) OVER (ORDER BY u.o) - u.nk)::integer
                      FROM unnest(p_nkeys) WITH ORDINALITY AS u(nk, o) ORDER BY u.o);
        RETURN QUERY
        WITH r AS (
            INSERT INTO {schema}.runs AS r (id, workflow, status, input, idempotency_key,
                                            lease_token, due_at, started_at, invocations,
                                            executing, flow_keys, flow_limits, priority,
                                            deadline, start_deadline, code_version)
            SELECT p_ids[x.o], p_workflows[x.o], 'running', x.inp, p_keys[x.o], p_tokens[x.o],
                   {schema}.clock_now() + p_leases[x.o], {schema}.clock_now(), 1, true,
                   p_flow_keys[offs[x.o] + 1 : offs[x.o] + p_nkeys[x.o]],
                   p_flow_limits[offs[x.o] + 1 : offs[x.o] + p_nkeys[x.o]],
                   p_priorities[x.o], {schema}.clock_now() + p_timeouts[x.o],
                   {schema}.clock_now() + p_start_timeouts[x.o], p_code_versions[x.o]
            -- Unnested in a select list, not FROM: each input goes straight on,
            -- in order (a conflict inside the batch resolves as one by one).
            FROM (SELECT unnest(p_inputs) AS inp, generate_subscripts(p_inputs, 1) AS o) AS x
            ON CONFLICT DO NOTHING
            RETURNING r.id, r.workflow, r.step_key, r.step_attempt, r.invocations,
                      r.lost_attempts, r.created_at, r.parent_id, r.flow_keys
        ), s AS (
            INSERT INTO {schema}.slots (key, run_id)
            SELECT DISTINCT x.k, r.id FROM r, unnest(r.flow_keys) AS x(k)
        )
        SELECT o.o::integer,
               CASE WHEN r.id IS NULL THEN 'conflict' ELSE 'claimed' END,
               r.id, r.workflow, r.step_key, r.step_attempt, r.invocations,
               r.lost_attempts, r.created_at, r.parent_id,
               CASE WHEN r.id IS NOT NULL THEN {schema}.clock_now() END
        FROM generate_series(1, n) AS o(o) LEFT JOIN r ON r.id = p_ids[o.o]
        ORDER BY o.o;
        RETURN;
    END IF;
    -- Run by run, each call seeing what the earlier ones wrote.
    FOR i IN 1 .. n LOOP
        RETURN QUERY
        SELECT i, g.*
        FROM {schema}.create_gated_lean(
            p_ids[i], p_workflows[i], p_inputs[i], p_keys[i], p_tokens[i], p_leases[i],
            CASE WHEN p_nkeys[i] IS NOT NULL THEN p_flow_keys[ok + 1 : ok + p_nkeys[i]] END,
            CASE WHEN p_nlimits[i] IS NOT NULL
                 THEN p_flow_limits[ol + 1 : ol + p_nlimits[i]] END,
            p_priorities[i], p_timeouts[i], p_start_timeouts[i],
            CASE WHEN p_nrates[i] IS NOT NULL THEN p_rate_keys[orr + 1 : orr + p_nrates[i]] END,
            CASE WHEN p_nspacing[i] IS NOT NULL
                 THEN p_rate_spacing[os + 1 : os + p_nspacing[i]] END,
            p_code_versions[i]) AS g;
        ok := ok + coalesce(p_nkeys[i], 0);
        ol := ol + coalesce(p_nlimits[i], 0);
        orr := orr + coalesce(p_nrates[i], 0);
        os := os + coalesce(p_nspacing[i], 0);
    END LOOP;
END
$$;

-- For a library at version 26: the same answers as before, the input of each
-- claimed run read back in a statement after the lean function's (so it sees
-- the run the function inserted).
CREATE OR REPLACE FUNCTION {schema}.create_gated(
    p_id uuid, p_workflow text, p_input json, p_key text, p_token uuid, p_lease interval,
    p_flow_keys text[], p_flow_limits integer[], p_priority integer, p_timeout interval,
    p_start_timeout interval, p_rate_keys text[], p_rate_spacing interval[],
    p_code_version text)
    RETURNS TABLE (outcome text, id uuid, workflow text, input text, step_key text,
                   step_attempt integer, invocations integer, lost_attempts integer,
                   created_at timestamptz, parent_id uuid, db_now timestamptz)
    LANGUAGE plpgsql
    SET enable_seqscan = off
    AS $$
#variable_conflict use_column
DECLARE
    g record;
BEGIN
    FOR g IN SELECT * FROM {schema}.create_gated_lean(
        p_id, p_workflow, p_input, p_key, p_token, p_lease, p_flow_keys, p_flow_limits,
        p_priority, p_timeout, p_start_timeout, p_rate_keys, p_rate_spacing, p_code_version)
    LOOP
        RETURN QUERY SELECT g.outcome, g.id, g.workflow,
                            (SELECT r.input::text FROM {schema}.runs r
                             WHERE r.id = g.id AND g.outcome = 'claimed'),
                            g.step_key, g.step_attempt, g.invocations, g.lost_attempts,
                            g.created_at, g.parent_id, g.db_now;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION {schema}.create_gated_batch(
    p_ids uuid[], p_workflows text[], p_inputs json[], p_keys text[], p_tokens uuid[],
    p_leases interval[], p_priorities integer[], p_timeouts interval[],
    p_start_timeouts interval[], p_code_versions text[], p_nkeys integer[],
    p_nlimits integer[], p_nrates integer[], p_nspacing integer[], p_flow_keys text[],
    p_flow_limits integer[], p_rate_keys text[], p_rate_spacing interval[],
    p_lock_runs uuid[], p_lock_keys text[], p_lock_rate_keys text[])
    RETURNS TABLE (ord integer, outcome text, id uuid, workflow text, input text,
                   step_key text, step_attempt integer, invocations integer,
                   lost_attempts integer, created_at timestamptz, parent_id uuid,
                   db_now timestamptz)
    LANGUAGE plpgsql
    SET enable_seqscan = off
    AS $$
#variable_conflict use_column
DECLARE
    g record;
BEGIN
    FOR g IN SELECT * FROM {schema}.create_gated_batch_lean(
        p_ids, p_workflows, p_inputs, p_keys, p_tokens, p_leases, p_priorities, p_timeouts,
        p_start_timeouts, p_code_versions, p_nkeys, p_nlimits, p_nrates, p_nspacing,
        p_flow_keys, p_flow_limits, p_rate_keys, p_rate_spacing, p_lock_runs, p_lock_keys,
        p_lock_rate_keys)
    LOOP
        RETURN QUERY SELECT g.ord, g.outcome, g.id, g.workflow,
                            (SELECT r.input::text FROM {schema}.runs r
                             WHERE r.id = g.id AND g.outcome = 'claimed'),
                            g.step_key, g.step_attempt, g.invocations, g.lost_attempts,
                            g.created_at, g.parent_id, g.db_now;
    END LOOP;
END
$$;
