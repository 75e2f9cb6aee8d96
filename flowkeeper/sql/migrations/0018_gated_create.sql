-- flowkeeper schema, version 18: a flow-controlled run created by the
-- endpoint (the run trigger() handed over) is inserted, asked through the
-- flow gate and claimed in one statement, as create_claimed_run does for a
-- run without flow control: one round trip, and it can share a group
-- commit's transaction, instead of a transaction of its own with an insert
-- and a claim.  The arguments are insert_run's ($1-$14); the insert is that
-- query's, word for word.  Additive: libraries that know only version 17 go
-- on inserting and claiming.

CREATE FUNCTION {schema}.create_gated(
    p_id uuid, p_workflow text, p_input json, p_key text, p_token uuid, p_lease interval,
    p_flow_keys text[], p_flow_limits integer[], p_priority integer, p_timeout interval,
    p_start_timeout interval, p_rate_keys text[], p_rate_spacing interval[],
    p_code_version text)
    RETURNS TABLE (outcome text, id uuid, workflow text, input text, step_key text,
                   step_attempt integer, invocations integer, lost_attempts integer,
                   created_at timestamptz, parent_id uuid, db_now timestamptz)
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
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
    -- Parked on a key, throttled, or past a deadline: flow_gate has said so in
    -- the run itself; nothing is claimed.
    IF NOT {schema}.flow_gate(p_id, p_token) THEN
        RETURN QUERY SELECT 'gated'::text, p_id, NULL::text, NULL::text, NULL::text,
                            NULL::integer, NULL::integer, NULL::integer, NULL::timestamptz,
                            NULL::uuid, NULL::timestamptz;
        RETURN;
    END IF;
    -- claim_run's update, for a run that has never run.
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
