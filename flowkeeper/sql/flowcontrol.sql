-- Flow control (flowkeeper.flowcontrol, migration 0009).  The gate itself
-- runs inside claim_run (queries.sql); these are its upkeep and its views.

-- name: flow_sweep
-- Wake runs parked on keys that have free slots (a safety net; see flow_sweep).
SELECT {schema}.flow_sweep($1);
