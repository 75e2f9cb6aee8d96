-- flowkeeper schema: dashboard sessions recorded in Postgres.
-- "{schema}" is replaced by the configured (validated) schema name.
--
-- The session cookie is signed (itsdangerous), so a forged one is refused
-- without a query; a genuine one must also have its row here, so signing out
-- ends the session on every instance of the app at once, and a cookie
-- captured before it is worthless after.  The row holds the SHA-256 of the
-- random session id, never the id itself: reading this table gives no one a
-- session.  Checking a session is one primary-key lookup.
CREATE TABLE {schema}.dashboard_sessions (
    id          bytea PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT {schema}.clock_now(),
    expires_at  timestamptz NOT NULL
);
-- Expired rows are swept by the next sign-in.
CREATE INDEX dashboard_sessions_expiry_idx ON {schema}.dashboard_sessions (expires_at);
