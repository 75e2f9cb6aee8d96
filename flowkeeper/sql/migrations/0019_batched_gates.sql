-- flowkeeper schema, version 19: flow-controlled writes in group commit
-- batches.  A batch is one transaction; the gates of the runs it creates
-- (create_gated) and the slot releases of the runs it ends (runs_flow_release)
-- each lock their keys in key order, but one after the other, so two batches
-- could take the same keys in opposite orders and deadlock.  A batch of
-- several such writes first calls flow_prelock with all of them: the rows of
-- its flow-controlled runs in id order, then every concurrency key in key
-- order, then every rate key's row in key order -- the order a lone claim
-- takes them in (row, keys, rate rows) -- so the locks its writes take later
-- are already held.  Additive: a library at version 18 sends no such batch
-- (and create_gated, below, answers as before).

CREATE FUNCTION {schema}.flow_prelock(p_runs uuid[], p_keys text[], p_rate_keys text[])
    RETURNS void
    LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    k text;
    held text[];
BEGIN
    SELECT array_agg(u.k) INTO held
    FROM (SELECT r.flow_keys FROM {schema}.runs r
          WHERE r.id = ANY (p_runs) AND r.flow_keys IS NOT NULL
          ORDER BY r.id
          FOR UPDATE OF r) AS x, unnest(x.flow_keys) AS u(k);
    PERFORM {schema}.flow_lock(coalesce(held, '{}') || coalesce(p_keys, '{}'));
    FOR k IN SELECT DISTINCT u.k FROM unnest(p_rate_keys) AS u(k) ORDER BY u.k LOOP
        INSERT INTO {schema}.rate_limits (key, tat) VALUES (k, '-infinity')
        ON CONFLICT DO NOTHING;
        PERFORM 1 FROM {schema}.rate_limits WHERE key = k FOR UPDATE;
    END LOOP;
END
$$;

-- Slots of key k held now by runs other than p_run: one probe of the run's
-- row per slot of k.  (Version 15's join let the plan PL/pgSQL caches --
-- generic, made for any key -- hash the whole runs table instead: 1.2 ms a
-- gate with 3,000 runs, growing with the table.  A LIMIT in the lateral
-- subquery keeps the planner from flattening it back into that join.)
CREATE OR REPLACE FUNCTION {schema}.flow_held(k text, p_run uuid) RETURNS integer
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
    RETURN (SELECT count(*)::integer
            FROM {schema}.slots s
            CROSS JOIN LATERAL (
                SELECT 1 FROM {schema}.runs x
                WHERE x.id = s.run_id AND x.executing AND x.lease_token IS NOT NULL
                  AND x.due_at > {schema}.clock_now()
                LIMIT 1) AS live
            WHERE s.key = k AND s.run_id <> p_run);
END
$$;

-- create_gated, with the common case first: a run with concurrency keys (no
-- rate keys) whose keys all have room is inserted already claimed, with its
-- slots, as create_claimed_run inserts a run without flow control -- one row
-- version instead of an insert and then claim_run's update.  Otherwise (a
-- key full, rate keys, no lease) as in version 18: inserted, asked through
-- flow_gate, and claimed if it lets the run go.
CREATE OR REPLACE FUNCTION {schema}.create_gated(
    p_id uuid, p_workflow text, p_input json, p_key text, p_token uuid, p_lease interval,
    p_flow_keys text[], p_flow_limits integer[], p_priority integer, p_timeout interval,
    p_start_timeout interval, p_rate_keys text[], p_rate_spacing interval[],
    p_code_version text)
    RETURNS TABLE (outcome text, id uuid, workflow text, input text, step_key text,
                   step_attempt integer, invocations integer, lost_attempts integer,
                   created_at timestamptz, parent_id uuid, db_now timestamptz)
    LANGUAGE plpgsql AS $$
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
                RETURNING r.id, r.workflow, r.input, r.step_key, r.step_attempt,
                          r.invocations, r.lost_attempts, r.created_at, r.parent_id
            ), s AS (
                INSERT INTO {schema}.slots (key, run_id)
                SELECT DISTINCT u.k, r.id FROM r, unnest(p_flow_keys) AS u(k)
            )
            SELECT 'claimed'::text, r.id, r.workflow, r.input::text, r.step_key,
                   r.step_attempt, r.invocations, r.lost_attempts, r.created_at, r.parent_id,
                   {schema}.clock_now()
            FROM r;
            IF NOT FOUND THEN  -- the same id created before, or the idempotency key taken
                RETURN QUERY SELECT 'conflict'::text, NULL::uuid, NULL::text, NULL::text,
                                    NULL::text, NULL::integer, NULL::integer, NULL::integer,
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
        RETURN QUERY SELECT 'conflict'::text, NULL::uuid, NULL::text, NULL::text, NULL::text,
                            NULL::integer, NULL::integer, NULL::integer, NULL::timestamptz,
                            NULL::uuid, NULL::timestamptz;
        RETURN;
    END IF;
    IF NOT {schema}.flow_gate(p_id, p_token) THEN
        RETURN QUERY SELECT 'gated'::text, p_id, NULL::text, NULL::text, NULL::text,
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
    RETURNING 'claimed'::text, r.id, r.workflow, r.input::text, r.step_key, r.step_attempt,
              r.invocations, r.lost_attempts, r.created_at, r.parent_id,
              {schema}.clock_now();
END
$$;
