-- flowkeeper schema, version 13: transactional steps and patches in the history.
--
-- Additive only (see flowkeeper/schemacompat.py): a library of an earlier
-- minor version keeps working on this schema.
--
-- kind 'transaction': ctx.transaction, a step whose record is written in the
-- same transaction as the user's own writes (flowkeeper/transactions.py).
-- kind 'patch': ctx.patched / ctx.deprecate_patch, which branch of a code
-- change a run took (flowkeeper/patches.py); status 'completed' with output
-- true (new code) or false (old code).
ALTER TABLE {schema}.steps DROP CONSTRAINT steps_kind_check;
ALTER TABLE {schema}.steps ADD CONSTRAINT steps_kind_check
    CHECK (kind IN ('step', 'sleep', 'wait', 'child', 'children', 'transaction', 'patch'));

-- The workflow's code version (define_workflow(..., version=...)) of the
-- process that started the run; NULL when none was set.
ALTER TABLE {schema}.runs ADD COLUMN code_version text;
