-- flowkeeper schema, version 20: a group commit batch of creates of
-- flow-controlled runs is gated as a set.  create_gated_many called
-- create_gated once per run: a PL/pgSQL call, a lock, a count and two
-- inserts each, 0.35 ms of server time per run, against 0.05 ms per run for
-- a batch of runs without flow control.  The common case is a limit that
-- does not bind: every key of the batch has room for every run of it that
-- holds the key.  Then the runs are inserted already claimed, with their
-- slots, in one statement, after one count per distinct key.  Any other
-- batch (a key without room for all of its runs, rate keys, a run without a
-- lease, an id repeated in the batch) goes run by run through create_gated,
-- as before.  The outcome is the same either way.  Additive: create_gated is
-- unchanged, and a library at version 19 never calls create_gated_batch.

-- Serialises everything that counts or frees the slots of one key (version
-- 15), with the common case of one key first: no query to sort and dedupe.
CREATE OR REPLACE FUNCTION {schema}.flow_lock(keys text[]) RETURNS void
    LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    k text;
BEGIN
    IF array_length(keys, 1) = 1 THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('{schema}.slot:' || keys[1], 0));
        RETURN;
    END IF;
    FOR k IN SELECT DISTINCT u.k FROM unnest(keys) AS u(k) ORDER BY u.k LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended('{schema}.slot:' || k, 0));
    END LOOP;
END
$$;

-- The arguments are create_gated_many's (queries.sql): one array per scalar
-- argument of create_gated, the length of each run's lists, the lists of all
-- the runs one after the other, and the batch's flow_prelock arguments when
-- this is the batch's first statement (NULL otherwise).  Returns each run's
-- position (from 1) and create_gated's answer for it.
CREATE FUNCTION {schema}.create_gated_batch(
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
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n integer := coalesce(array_length(p_ids, 1), 0);
    i integer;
    ok integer := 0;
    ol integer := 0;
    orr integer := 0;
    os integer := 0;
    room boolean;
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
        -- limit for it.  A run that will conflict is counted too: the test can
        -- only be stricter than one by one, where each run sees the slots of
        -- the runs before it.
        WITH rk AS (
            -- Each run's keys with its limit for them: the lists' elements
            -- matched to their run through the running sum of the lengths.
            SELECT f.k, f.lim, c.o
            FROM unnest(p_flow_keys, p_flow_limits) WITH ORDINALITY AS f(k, lim, at)
            JOIN (SELECT u.o, sum(u.nk) OVER (ORDER BY u.o) AS upto
                  FROM unnest(p_nkeys) WITH ORDINALITY AS u(nk, o)) AS c
              ON f.at <= c.upto AND f.at > c.upto - p_nkeys[c.o]
        ), need AS (
            SELECT rk.k, count(DISTINCT rk.o) AS runs, min(rk.lim) AS lim
            FROM rk GROUP BY rk.k
        )
        -- flow_held's count, for each distinct key.
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
        RETURN QUERY
        WITH u AS (
            SELECT *
            FROM unnest(p_ids, p_workflows, p_inputs, p_keys, p_tokens, p_leases,
                        p_priorities, p_timeouts, p_start_timeouts, p_code_versions,
                        p_nkeys) WITH ORDINALITY
                 AS u(rid, wf, inp, ikey, token, lease, priority, timeout, start_timeout,
                      code_version, nk, o)
        ), c AS (
            SELECT u.*, (sum(u.nk) OVER (ORDER BY u.o) - u.nk)::integer AS at FROM u
        ), r AS (
            -- create_gated's insert of a run with room, for each run.
            INSERT INTO {schema}.runs AS r (id, workflow, status, input, idempotency_key,
                                            lease_token, due_at, started_at, invocations,
                                            executing, flow_keys, flow_limits, priority,
                                            deadline, start_deadline, code_version)
            SELECT c.rid, c.wf, 'running', c.inp, c.ikey, c.token,
                   {schema}.clock_now() + c.lease, {schema}.clock_now(), 1, true,
                   p_flow_keys[c.at + 1 : c.at + c.nk], p_flow_limits[c.at + 1 : c.at + c.nk],
                   c.priority, {schema}.clock_now() + c.timeout,
                   {schema}.clock_now() + c.start_timeout, c.code_version
            FROM c ORDER BY c.o
            ON CONFLICT DO NOTHING
            RETURNING r.id, r.workflow, r.input, r.step_key, r.step_attempt, r.invocations,
                      r.lost_attempts, r.created_at, r.parent_id, r.flow_keys
        ), s AS (
            INSERT INTO {schema}.slots (key, run_id)
            SELECT DISTINCT x.k, r.id FROM r, unnest(r.flow_keys) AS x(k)
        )
        SELECT c.o::integer,
               CASE WHEN r.id IS NULL THEN 'conflict' ELSE 'claimed' END,
               r.id, r.workflow, r.input::text, r.step_key, r.step_attempt, r.invocations,
               r.lost_attempts, r.created_at, r.parent_id,
               CASE WHEN r.id IS NOT NULL THEN {schema}.clock_now() END
        FROM c LEFT JOIN r ON r.id = c.rid
        ORDER BY c.o;
        RETURN;
    END IF;
    -- Run by run, each call seeing what the earlier ones wrote.
    FOR i IN 1 .. n LOOP
        RETURN QUERY
        SELECT i, g.*
        FROM {schema}.create_gated(
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
