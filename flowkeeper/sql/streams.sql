-- A run's stream (flowkeeper.streams): ctx.publish writes, fk.stream reads.

-- name: stream_count
SELECT count(*) FROM {schema}.stream_messages WHERE run_id = $1;

-- name: stream_append
-- Append messages to run $1's stream (one array per column) and wake its
-- live readers ("<schema> <run id>" on channel flowkeeper_stream).
WITH ins AS (
    INSERT INTO {schema}.stream_messages (run_id, topic, step_key, attempt, data)
    SELECT $1, x.topic, x.step_key, x.attempt, x.data
    FROM unnest($2::text[], $3::text[], $4::integer[], $5::json[])
         WITH ORDINALITY AS x(topic, step_key, attempt, data, ord)
    ORDER BY x.ord
    RETURNING id
)
SELECT (SELECT max(id) FROM ins) AS last,
       pg_notify('flowkeeper_stream', '{schema} ' || $1::text) AS notified;

-- name: stream_read
-- Messages of run $1 after cursor $2 (optionally of topic $3), oldest first,
-- at most $4, each with whether its attempt is final: 'final' (outside any
-- step, or the attempt whose result was recorded), 'superseded' (an attempt
-- that failed or was lost, or not the recorded one) or 'pending' (its step
-- has not ended yet); and the run's status.
SELECT m.id, m.topic, m.step_key, m.attempt, m.data::text AS data, m.at,
       CASE
           WHEN m.step_key IS NULL THEN 'final'
           WHEN s.key IS NOT NULL AND s.attempts = m.attempt THEN 'final'
           WHEN s.key IS NOT NULL THEN 'superseded'
           WHEN EXISTS (SELECT 1 FROM {schema}.events e
                        WHERE e.run_id = m.run_id AND e.step_key = m.step_key
                          AND e.attempt = m.attempt
                          AND e.kind IN ('attempt_failed', 'attempt_lost'))
               THEN 'superseded'
           ELSE 'pending'
       END AS finality
FROM {schema}.stream_messages m
LEFT JOIN {schema}.steps s ON s.run_id = m.run_id AND s.key = m.step_key
WHERE m.run_id = $1 AND m.id > $2 AND ($3::text IS NULL OR m.topic = $3::text)
ORDER BY m.id
LIMIT $4;

-- name: stream_run_status
SELECT status FROM {schema}.runs WHERE id = $1;
