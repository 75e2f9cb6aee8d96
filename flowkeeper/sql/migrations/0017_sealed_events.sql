-- flowkeeper schema, version 17: event data sealed at rest.
--
-- With FlowKeeper(codec=...) an event's payload is stored sealed (what a
-- wait returns, opened by the library) and waits match on a separate index
-- of the data: the same structure with every value a keyed hash, one copy
-- per codec key, each under its key's scope (flowkeeper.codec).  send_event
-- gains that index as p_data; NULL is the payload itself, as before.  The
-- five-argument send_event of version 7 stays, for libraries that know only
-- it (additive).

CREATE FUNCTION {schema}.send_event(
    p_name text, p_key text, p_payload json, p_run uuid, p_lease interval, p_data jsonb)
    RETURNS TABLE (kind text, event_id bigint, run_id uuid, lease uuid)
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    eid bigint;
    d jsonb := coalesce(p_data, p_payload::jsonb);
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

-- The version-7 form: the same, the payload its own index.
CREATE OR REPLACE FUNCTION {schema}.send_event(
    p_name text, p_key text, p_payload json, p_run uuid, p_lease interval)
    RETURNS TABLE (kind text, event_id bigint, run_id uuid, lease uuid)
    LANGUAGE sql AS $$
    SELECT * FROM {schema}.send_event(p_name, p_key, p_payload, p_run, p_lease, NULL::jsonb)
$$;
