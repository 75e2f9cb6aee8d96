-- flowkeeper schema, version 21: the flow-control functions find their rows
-- through indexes, whatever the tables' size when their plans were made.
--
-- PL/pgSQL caches each query's plan per session.  A plan made while runs
-- (or slots, or rate_limits) held a few pages, or right after a VACUUM
-- ANALYZE of a nearly empty table, reads the whole table instead of its
-- index: cheaper then, and kept while the table grows, until the next
-- ANALYZE.  flow_prelock's `id = ANY (...)` read every run, once per group
-- commit batch; flow_gate's, flow_held's and flow_wake's lookups likewise.
-- In a scratch probe of a new database growing by 9,000 runs a round, that
-- cost 0.1-0.35 ms of Postgres CPU per limited workflow, growing with the
-- table.  Every query in these functions is a lookup by
-- key, for which an index exists: with enable_seqscan off while they run the
-- planner takes the index (a lookup in a table of a few rows costs the
-- same), and still scans a table where no index would serve.  Behaviour is
-- unchanged, so a library at version 20 can use this schema.
--
-- CREATE OR REPLACE FUNCTION drops this setting: a later migration that
-- replaces one of these functions must say SET enable_seqscan = off again
-- (tests/integration/test_flow_plans.py checks that each one has it).
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = '{schema}'
          AND p.proname IN ('flow_gate', 'flow_held', 'flow_wake', 'flow_release',
                            'flow_throttle', 'flow_sweep', 'flow_prelock', 'create_gated',
                            'create_gated_batch')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET enable_seqscan = off', f);
    END LOOP;
END
$$;
