-- Flow control (flowkeeper.flowcontrol, migration 0009).  The gate itself
-- runs inside claim_run (queries.sql); these are its upkeep and its views.

-- name: flow_sweep
-- Wake runs parked on keys that have free slots (a safety net; see flow_sweep).
SELECT {schema}.flow_sweep($1);

-- name: schema_usage
-- Per table of the schema: rows (exact below a million, else the planner's
-- estimate) and size on disk with its indexes and TOAST, for `flowkeeper status`.
SELECT c.relname AS name,
       CASE WHEN c.reltuples >= 1000000 THEN c.reltuples::bigint
            ELSE (xpath('/row/n/text()',
                        query_to_xml(format('SELECT count(*) AS n FROM %I.%I', n.nspname,
                                            c.relname), false, true, '')))[1]::text::bigint
       END AS rows,
       c.reltuples >= 1000000 AS estimated,
       pg_total_relation_size(c.oid) AS bytes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = '{schema}' AND c.relkind = 'r'
ORDER BY pg_total_relation_size(c.oid) DESC, c.relname;

-- name: flow_usage
-- Per concurrency key with runs holding or waiting for its slots: slots held
-- now, runs parked on it, and its limit (as the runs carry it).
WITH held AS (
    SELECT s.key, count(*) AS held
    FROM {schema}.slots s JOIN {schema}.runs x ON x.id = s.run_id
    WHERE x.executing AND x.lease_token IS NOT NULL AND x.due_at > {schema}.clock_now()
    GROUP BY s.key
), parked AS (
    SELECT blocked_key AS key, count(*) AS parked
    FROM {schema}.runs WHERE blocked_key IS NOT NULL AND status = 'queued'
    GROUP BY blocked_key
), keys AS (
    SELECT key FROM held UNION SELECT key FROM parked
)
SELECT k.key, coalesce(h.held, 0) AS held, coalesce(p.parked, 0) AS parked,
       (SELECT r.flow_limits[array_position(r.flow_keys, k.key)]
        FROM {schema}.runs r JOIN {schema}.slots s ON s.run_id = r.id AND s.key = k.key
        LIMIT 1) AS held_limit,
       (SELECT r.flow_limits[array_position(r.flow_keys, k.key)]
        FROM {schema}.runs r WHERE r.blocked_key = k.key AND r.status = 'queued'
        LIMIT 1) AS parked_limit
FROM keys k LEFT JOIN held h ON h.key = k.key LEFT JOIN parked p ON p.key = k.key
ORDER BY coalesce(p.parked, 0) DESC, coalesce(h.held, 0) DESC, k.key
LIMIT $1;

-- name: queued_reason
-- Why a live run has not started: parked on a key, or due later (throttled,
-- debounced, a retry...), with the key's slot usage.
SELECT r.status, r.blocked_key, r.due_at, r.priority, r.started_at, r.debounce_key,
       r.throttled_until,
       r.flow_limits[array_position(r.flow_keys, r.blocked_key)] AS key_limit,
       (SELECT count(*) FROM {schema}.slots s JOIN {schema}.runs x ON x.id = s.run_id
        WHERE s.key = r.blocked_key AND x.executing AND x.lease_token IS NOT NULL
          AND x.due_at > {schema}.clock_now()) AS key_held,
       (SELECT count(*) FROM {schema}.runs b
        WHERE b.blocked_key = r.blocked_key AND b.status = 'queued'
          AND (b.priority > r.priority OR (b.priority = r.priority AND b.id < r.id))) AS ahead,
       {schema}.clock_now() AS now
FROM {schema}.runs r WHERE r.id = $1;

-- name: debounce_run
-- A trigger of a debounced workflow: the key's run that has not started yet
-- takes the latest input and is due once the key has been quiet for $5; else
-- a new run.  A dispatch already in flight for it is called off (its lease
-- dropped): the run starts after the new quiet period, with the new input.
-- $6-$13: as insert_run's flow control.
INSERT INTO {schema}.runs AS r (id, workflow, status, input, debounce_key, due_at,
                                flow_keys, flow_limits, priority, deadline, start_deadline,
                                rate_keys, rate_spacing)
VALUES ($1, $2, 'queued', $3::json, $4, {schema}.clock_now() + $5::interval,
        $6::text[], $7::integer[], $8::integer,
        {schema}.clock_now() + $9::interval, {schema}.clock_now() + $10::interval,
        $11::text[], $12::interval[])
ON CONFLICT (workflow, debounce_key)
    WHERE debounce_key IS NOT NULL AND status = 'queued' AND started_at IS NULL
DO UPDATE SET input = excluded.input, due_at = excluded.due_at, lease_token = NULL,
              flow_keys = excluded.flow_keys, flow_limits = excluded.flow_limits,
              rate_keys = excluded.rate_keys, rate_spacing = excluded.rate_spacing,
              updated_at = {schema}.clock_now()
RETURNING id, (xmax = 0) AS created;
