-- Rate limits on single steps (flowkeeper.steprates, migration 0023).

-- name: step_rate_take
-- Attempt $3 of step $2 of run $1 takes its start time from rate key $4
-- (one start every $5): the ticket it holds already, or the key's next free
-- time.  A time more than $6 away is kept as its ticket (the run sleeps until
-- then); a ticket used now is deleted.  `fresh`: this call reserved it;
-- `kept`: the time is further off than $6, kept as the attempt's ticket.
-- The rate_limits row is updated under its row lock, so concurrent takes
-- queue one spacing apart (ON CONFLICT reads the latest version).
WITH held AS (
    SELECT t.slot FROM {schema}.step_tickets t
    WHERE t.run_id = $1 AND t.step_key = $2 AND t.attempt = $3
), used AS (
    DELETE FROM {schema}.step_tickets t
    WHERE t.run_id = $1 AND t.step_key = $2 AND t.attempt = $3
      AND t.slot <= {schema}.clock_now() + $6::interval
), took AS (
    INSERT INTO {schema}.rate_limits AS r (key, tat)
    SELECT $4, {schema}.clock_now() + $5::interval
    WHERE NOT EXISTS (SELECT 1 FROM held)
    ON CONFLICT (key) DO UPDATE
        SET tat = greatest(r.tat, {schema}.clock_now()) + $5::interval
    RETURNING r.tat - $5::interval AS slot
), kept AS (
    INSERT INTO {schema}.step_tickets (run_id, step_key, attempt, slot)
    SELECT $1, $2, $3, took.slot FROM took
    WHERE took.slot > {schema}.clock_now() + $6::interval
    ON CONFLICT (run_id, step_key, attempt) DO UPDATE SET slot = excluded.slot
)
SELECT coalesce((SELECT slot FROM held), (SELECT slot FROM took)) AS slot,
       NOT EXISTS (SELECT 1 FROM held) AS fresh,
       coalesce((SELECT slot FROM held), (SELECT slot FROM took))
           > {schema}.clock_now() + $6::interval AS kept,
       {schema}.clock_now() AS now;
