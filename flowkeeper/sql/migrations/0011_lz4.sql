-- flowkeeper schema, version 11: payloads compressed with lz4 where the server has it.
--
-- Step results, inputs and run outputs are TOASTed when large.  Postgres's
-- default compression (pglz) is several times slower than lz4 at both ends;
-- servers built with lz4 (most packaged builds of 14+: Debian, RDS, Neon,
-- Supabase) offer it per column.  Only new values are compressed this way;
-- nothing is rewritten, so this takes a moment on any table size.  On a
-- server without lz4 this migration changes nothing.
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_settings
        WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)
    ) THEN
        ALTER TABLE {schema}.steps
            ALTER COLUMN input SET COMPRESSION lz4,
            ALTER COLUMN output SET COMPRESSION lz4,
            ALTER COLUMN error SET COMPRESSION lz4;
        ALTER TABLE {schema}.runs
            ALTER COLUMN input SET COMPRESSION lz4,
            ALTER COLUMN output SET COMPRESSION lz4;
        ALTER TABLE {schema}.event_log
            ALTER COLUMN payload SET COMPRESSION lz4;
        ALTER TABLE {schema}.stream_messages
            ALTER COLUMN data SET COMPRESSION lz4;
    END IF;
END
$$;
