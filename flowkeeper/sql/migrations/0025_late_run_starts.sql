-- flowkeeper schema, version 25: a run-level rate limit holds however late
-- its runs are woken (flowkeeper.flowcontrol, RateLimit).
--
-- A run over the rate reserves a start time and is due then.  Version 15
-- started it whenever it was next claimed, however late.  With a driver
-- coarser than the spacing (pg_cron's minute, a cron'd tick) or after an
-- outage, every reservation that passed meanwhile started at once: 30 starts
-- in one second under a 10/s limit (tests/integration/test_rate_limits.py,
-- the coarse-driver test).  Now, as for step rate limits (migration 24):
--
-- * On time (claimed within one spacing after its time, or 0.1 s for a
--   shorter spacing): it starts.
-- * Early (before its time: a sweep, a re-push): due at its time again; it
--   takes nothing, and no limit is passed by waking a run early.
-- * Late: it takes the keys' next time instead (an exchange), however far,
--   once (rate_exchanged).  Late again, it takes a time only within the
--   claimant's reach (the setting flowkeeper.rate_reach, which claim_run
--   sets from the invocation's time budget; 0 when unset, as by a library
--   at version 24); else it keeps its place, takes nothing, and is due when
--   the keys' next time comes within reach.  So a backlog drains under a
--   coarse driver instead of being exchanged to the back at every tick.
--
-- The invocation waits for a near time itself (flowkeeper.engine,
-- Engine.claim_when_due).  rate_exchanged is a new nullable column (no
-- rewrite); a library at version 24 can use this schema.
ALTER TABLE {schema}.runs ADD COLUMN rate_exchanged boolean;

CREATE OR REPLACE FUNCTION {schema}.flow_throttle(r record) RETURNS boolean
    LANGUAGE plpgsql VOLATILE
    SET enable_seqscan = off
    AS $$
DECLARE
    i integer;
    now_ timestamptz := {schema}.clock_now();
    at timestamptz := now_;
    t timestamptz;
    k text;
    late boolean := false;
    reach interval := interval '0';
BEGIN
    IF r.rate_keys IS NULL OR r.started_at IS NOT NULL THEN
        RETURN true;
    END IF;
    IF r.throttled_until IS NOT NULL THEN
        IF r.throttled_until > now_ THEN
            -- Early: due at its time again, taking nothing.
            UPDATE {schema}.runs
            SET due_at = r.throttled_until, lease_token = NULL, status = 'queued',
                lost_attempts = lost_attempts + CASE WHEN executing THEN 1 ELSE 0 END,
                executing = false, updated_at = now_
            WHERE id = r.id;
            RETURN false;
        END IF;
        IF r.throttled_until >= now_ - greatest((SELECT max(s) FROM unnest(r.rate_spacing) AS u(s)),
                                                 interval '100 milliseconds') THEN
            -- On time: claim_run sets started_at, so it is never asked again.
            -- (Within a spacing, or 0.1 s for a spacing shorter than a claim
            -- and a dispatch take: a late wake of that size bunches at most
            -- a tenth of a second's starts, and taking a new time for it
            -- would waste the one it had.)
            RETURN true;
        END IF;
        late := true;
        IF (SELECT x.rate_exchanged FROM {schema}.runs x WHERE x.id = r.id) IS TRUE THEN
            reach := coalesce(nullif(current_setting('flowkeeper.rate_reach', true), '')::interval,
                              interval '0');
        ELSE
            reach := NULL;  -- the first exchange: any distance
        END IF;
    END IF;
    FOR k IN SELECT DISTINCT u.k FROM unnest(r.rate_keys) AS u(k) ORDER BY u.k LOOP
        INSERT INTO {schema}.rate_limits (key, tat) VALUES (k, '-infinity')
        ON CONFLICT DO NOTHING;
        SELECT tat INTO t FROM {schema}.rate_limits WHERE key = k FOR UPDATE;
        at := greatest(at, t);
    END LOOP;
    IF late AND reach IS NOT NULL AND at > now_ + reach THEN
        -- Late again, the keys' next time out of reach: it keeps its place
        -- (its reserved time, passed) and looks again once it is within reach.
        UPDATE {schema}.runs
        SET due_at = at - reach, lease_token = NULL, status = 'queued',
            lost_attempts = lost_attempts + CASE WHEN executing THEN 1 ELSE 0 END,
            executing = false, updated_at = now_
        WHERE id = r.id;
        RETURN false;
    END IF;
    FOR i IN 1 .. array_length(r.rate_keys, 1) LOOP
        UPDATE {schema}.rate_limits SET tat = at + r.rate_spacing[i] WHERE key = r.rate_keys[i];
    END LOOP;
    IF at <= now_ THEN
        -- Starts now: claim_run sets started_at, so it is never asked again.
        -- (The run's row must not be written here: claim_run writes it next.)
        RETURN true;
    END IF;
    UPDATE {schema}.runs
    SET throttled_until = at, due_at = at, lease_token = NULL, status = 'queued',
        rate_exchanged = CASE WHEN late THEN true ELSE rate_exchanged END,
        lost_attempts = lost_attempts + CASE WHEN executing THEN 1 ELSE 0 END,
        executing = false, updated_at = now_
    WHERE id = r.id;
    INSERT INTO {schema}.events (run_id, kind, detail)
    VALUES (r.id, 'throttled', jsonb_build_object('until', at, 'keys', to_jsonb(r.rate_keys))
                               || CASE WHEN late THEN jsonb_build_object('late', true)
                                       ELSE '{}'::jsonb END);
    RETURN false;
END
$$;

-- claim_run's gate: flow_gate, with the claimant's reach for late runs set
-- for this transaction (read by flow_throttle).
CREATE FUNCTION {schema}.flow_gate_within(p_run uuid, p_token uuid, p_reach interval)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE
    SET enable_seqscan = off
    AS $$
BEGIN
    PERFORM set_config('flowkeeper.rate_reach', p_reach::text, true);
    RETURN {schema}.flow_gate(p_run, p_token);
END
$$;
