-- flowkeeper schema, version 4: values cross the database unchanged.
--
-- jsonb normalises what it stores: object keys come back shortest first, and
-- numbers as Postgres numerics (1e16 returns as 10000000000000000, an int in
-- Python).  A workflow replayed from jsonb could see a step's dict in another
-- order than its first execution did, and loop over it differently.  The
-- values a workflow sees (a run's input, each step's result) and what it
-- returns are kept as json, the exact text flowkeeper wrote; json still
-- validates the syntax, and ->/->> work on it for the dashboard.
ALTER TABLE {schema}.runs
    ALTER COLUMN input TYPE json USING input::json,
    ALTER COLUMN output TYPE json USING output::json;
ALTER TABLE {schema}.steps
    ALTER COLUMN input TYPE json USING input::json,
    ALTER COLUMN output TYPE json USING output::json;
