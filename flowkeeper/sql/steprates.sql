-- Rate limits on single steps (flowkeeper.steprates, migration 0023).

-- name: step_rate_take
-- Attempt $3 of step $2 of run $1 takes its start time from rate key $4
-- (one start every $5): the ticket it holds already, or the key's next free
-- time.  A time more than $6 away is kept as its ticket (the run sleeps until
-- then); a ticket used now is deleted.  `fresh`: this call reserved it;
-- `kept`: the time is further off than $6, kept as the attempt's ticket;
-- `exchanged`: the ticket held was itself a late exchange (step_rate_retake).
-- The rate_limits row is updated under its row lock, so concurrent takes
-- queue one spacing apart (ON CONFLICT reads the latest version).
WITH held AS (
    SELECT t.slot, t.exchanged FROM {schema}.step_tickets t
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
       coalesce((SELECT exchanged FROM held), false) AS exchanged,
       {schema}.clock_now() AS now;

-- name: step_rate_retake
-- Attempt $3 of step $2 of run $1 used its ticket (time $7) more than one
-- spacing (or 0.1 s) late: it takes rate key $4's next time instead (one start every
-- $5), kept as its ticket, marked exchanged, when more than $6 away.  A
-- ticket that was already such an exchange ($8) takes a time only within
-- $6; else it takes nothing and keeps time $7, and `slot` says when the
-- key's next time comes within $6.  So under a driver that wakes runs late,
-- exchanges do not push a backlog to the back of the queue for ever.
WITH nxt AS (
    SELECT greatest(r.tat, {schema}.clock_now()) AS at
    FROM {schema}.rate_limits r WHERE r.key = $4
), took AS (
    INSERT INTO {schema}.rate_limits AS r (key, tat)
    SELECT $4, {schema}.clock_now() + $5::interval
    WHERE NOT $8::boolean
       OR coalesce((SELECT at FROM nxt), '-infinity') <= {schema}.clock_now() + $6::interval
    ON CONFLICT (key) DO UPDATE
        SET tat = greatest(r.tat, {schema}.clock_now()) + $5::interval
    RETURNING r.tat - $5::interval AS slot
), kept AS (
    INSERT INTO {schema}.step_tickets (run_id, step_key, attempt, slot, exchanged)
    SELECT $1, $2, $3, coalesce((SELECT slot FROM took), $7::timestamptz), true
    WHERE coalesce((SELECT slot FROM took) > {schema}.clock_now() + $6::interval, true)
    ON CONFLICT (run_id, step_key, attempt) DO UPDATE
        SET slot = excluded.slot, exchanged = true
)
SELECT coalesce((SELECT slot FROM took), (SELECT at FROM nxt) - $6::interval) AS slot,
       EXISTS (SELECT 1 FROM took) AS fresh,
       coalesce((SELECT slot FROM took) > {schema}.clock_now() + $6::interval, true) AS kept,
       true AS exchanged,
       {schema}.clock_now() AS now;
