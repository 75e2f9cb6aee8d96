-- ctx.transaction (flowkeeper/transactions.py): run on the connection of the
-- user's transaction, before the user's function.

-- name: transaction_run_check
-- Whether this connection reaches the run (and its schema): no row, or an
-- undefined table, means the connection is to another database.  `ours`:
-- the invocation still holds the lease (the commit fences again at the end).
SELECT lease_token = $2 AS ours FROM {schema}.runs WHERE id = $1;
