-- A run's captured log lines (flowkeeper.steplogs).

-- name: step_logs_append
-- Append lines to run $1 (one array per column) while the run's logs stay
-- within $8 bytes; the first batch that does not fit adds one line saying so.
WITH used AS (
    SELECT coalesce(sum(octet_length(message)), 0) AS bytes,
           coalesce(bool_or(logger = 'flowkeeper' AND message LIKE '[flowkeeper] run log cap%'),
                    false) AS capped
    FROM {schema}.step_logs WHERE run_id = $1
), x AS (
    SELECT x.*, sum(octet_length(x.message)) OVER (ORDER BY x.ord) AS running
    FROM unnest($2::text[], $3::integer[], $4::integer[], $5::text[], $6::text[],
                $7::timestamptz[])
         WITH ORDINALITY AS x(step_key, attempt, level, logger, message, at, ord)
), rows AS (
    SELECT x.ord, x.step_key, x.attempt, x.level, x.logger, x.message, x.at
    FROM x, used WHERE used.bytes + x.running <= $8
    UNION ALL
    SELECT 1e9::bigint, NULL, NULL, 30, 'flowkeeper',
           '[flowkeeper] run log cap of ' || $8 || ' bytes reached: later log lines of this '
           || 'run are not kept (see FlowKeeper(run_log_bytes=...))', clock_timestamp()
    FROM used
    WHERE NOT used.capped AND used.bytes + (SELECT coalesce(max(running), 0) FROM x) > $8
)
INSERT INTO {schema}.step_logs (run_id, step_key, attempt, level, logger, message, at)
SELECT $1, step_key, attempt, level, logger, message, at FROM rows ORDER BY ord;

-- name: step_logs_read
SELECT id, step_key, attempt, level, logger, message, at
FROM {schema}.step_logs WHERE run_id = $1 ORDER BY id LIMIT $2;

-- name: step_logs_version
SELECT coalesce(max(id), 0) FROM {schema}.step_logs WHERE run_id = $1;
