-- flowkeeper schema, version 19: flow-controlled writes in group commit
-- batches.  A batch is one transaction; the gates of the runs it creates
-- (create_gated) and the slot releases of the runs it ends (runs_flow_release)
-- each lock their keys in key order, but one after the other, so two batches
-- could take the same keys in opposite orders and deadlock.  A batch of
-- several such writes first calls flow_prelock with all of them: the rows of
-- its flow-controlled runs in id order, then every concurrency key in key
-- order, then every rate key's row in key order -- the order a lone claim
-- takes them in (row, keys, rate rows) -- so the locks its writes take later
-- are already held.  Additive: a library at version 18 sends no such batch.

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
