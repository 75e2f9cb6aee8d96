-- flowkeeper schema, version 12: large step outputs sent ahead in chunks.
--
-- A step output of hundreds of megabytes, sent as one statement parameter,
-- costs the sending process several copies of it in its driver's buffers.
-- The store sends a large output ahead as chunks of a few megabytes, each its
-- own statement, and the commit that records the step puts them together
-- (staged_output), fenced by the same lease token.
--
-- UNLOGGED: the chunks matter only until that commit, which writes the whole
-- value to steps (WAL-logged) once.  A server crash empties this table; the
-- commit then finds chunks missing and fails (never records a partial
-- value), and the step runs again like any step whose record was not written.
CREATE UNLOGGED TABLE {schema}.step_chunks (
    run_id uuid NOT NULL,
    key    text NOT NULL,
    token  uuid NOT NULL,
    seq    integer NOT NULL,
    chunk  bytea NOT NULL,   -- UTF-8; a chunk may end inside a character
    PRIMARY KEY (run_id, key, token, seq)
);

CREATE FUNCTION {schema}.staged_output(p_run uuid, p_key text, p_token uuid, p_chunks integer)
RETURNS json
LANGUAGE plpgsql STABLE AS $$
DECLARE
    n integer;
    body bytea;
BEGIN
    SELECT count(*), string_agg(chunk, ''::bytea ORDER BY seq) INTO n, body
    FROM {schema}.step_chunks
    WHERE run_id = p_run AND key = p_key AND token = p_token;
    IF n IS DISTINCT FROM p_chunks THEN
        RAISE EXCEPTION 'flowkeeper: % of the % staged chunks of step % of run % are missing',
            p_chunks - coalesce(n, 0), p_chunks, p_key, p_run
            USING HINT = 'The chunks were lost (a server crash empties the unlogged table); '
                         'the step runs again.';
    END IF;
    RETURN convert_from(body, 'UTF8')::json;
END
$$;
