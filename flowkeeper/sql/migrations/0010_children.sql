-- flowkeeper schema, version 10: child runs (ctx.start_child, ctx.invoke, ctx.wait_for_children).
--
-- A child is a run of its own, with its own invocations, that carries its
-- parent and the parent's step that started it.  (parent_id, parent_step) is
-- unique: a replayed or duplicated parent never starts a second child.
--
-- One way to suspend: a parent waiting for children records the wait in its
-- history (kind 'children') and in `child_waits` (how many of them are still
-- running); each child's completion decrements that count in its own
-- finishing transaction, and the last one makes the parent due.  A parent's
-- wake-up costs O(1) per child, never a scan of its children.
--
-- Per-parent concurrency: at most `child_limit` children are live at once
-- (`child_slots`); the others are stored held (queued, no due time) and each
-- finishing child releases the oldest held sibling.
--
-- Cancelling a parent cancels its live children (unless started with
-- cancel_with_parent = false), and theirs, in the same transaction.  A
-- cancelled parent resumed by an operator resumes, when it waits for them
-- again, the children that were cancelled with it.

ALTER TABLE {schema}.runs
    ADD COLUMN parent_id uuid REFERENCES {schema}.runs (id) ON DELETE SET NULL,
    ADD COLUMN parent_step text,
    ADD COLUMN cancel_with_parent boolean NOT NULL DEFAULT true,
    ADD COLUMN awaited_by text,  -- the parent's wait (history key) this child completes
    ADD COLUMN cancelled_by_parent boolean NOT NULL DEFAULT false;

CREATE UNIQUE INDEX runs_parent_step_idx ON {schema}.runs (parent_id, parent_step)
    WHERE parent_id IS NOT NULL;
CREATE INDEX runs_held_children_idx ON {schema}.runs (parent_id, created_at)
    WHERE parent_id IS NOT NULL AND status = 'queued' AND due_at IS NULL;

ALTER TABLE {schema}.steps DROP CONSTRAINT steps_kind_check;
ALTER TABLE {schema}.steps ADD CONSTRAINT steps_kind_check
    CHECK (kind IN ('step', 'sleep', 'wait', 'child', 'children'));

CREATE TABLE {schema}.child_slots (
    parent_id   uuid PRIMARY KEY REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    live        integer NOT NULL DEFAULT 0,  -- children started and not finished (not held)
    max_live    integer NOT NULL
);

CREATE TABLE {schema}.child_waits (
    parent_id   uuid NOT NULL REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    key         text NOT NULL,
    remaining   integer NOT NULL,
    PRIMARY KEY (parent_id, key)
);

-- Start a child under the parent's lease (fenced), once per (parent, step).
-- Returns no row when the parent's lease is lost; else the child's id,
-- whether it was created now, and the lease token of its push (NULL: held
-- back by the parent's limit, or no push; it is then due for the scheduler).
CREATE FUNCTION {schema}.start_child(
    p_parent uuid, p_token uuid, p_child uuid, p_workflow text, p_input json,
    p_step text, p_cancel boolean, p_limit integer, p_push uuid, p_lease interval)
RETURNS TABLE (child_id uuid, created boolean, push_token uuid)
LANGUAGE plpgsql AS $$
DECLARE
    v_existing uuid;
    v_live integer;
    v_run boolean;
BEGIN
    PERFORM 1 FROM {schema}.runs
    WHERE id = p_parent AND lease_token = p_token
      AND status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT id INTO v_existing FROM {schema}.runs
    WHERE parent_id = p_parent AND parent_step = p_step;
    IF v_existing IS NOT NULL THEN
        RETURN QUERY SELECT v_existing, false, NULL::uuid;
        RETURN;
    END IF;
    INSERT INTO {schema}.child_slots AS c (parent_id, live, max_live)
    VALUES (p_parent, 0, p_limit)
    ON CONFLICT (parent_id) DO UPDATE SET max_live = p_limit
    RETURNING c.live INTO v_live;
    v_run := v_live < p_limit;
    INSERT INTO {schema}.runs (id, workflow, status, input, lease_token, due_at,
                               parent_id, parent_step, cancel_with_parent)
    VALUES (p_child, p_workflow, 'queued', p_input,
            CASE WHEN v_run THEN p_push END,
            CASE WHEN v_run THEN {schema}.clock_now() + p_lease END,
            p_parent, p_step, p_cancel);
    IF v_run THEN
        UPDATE {schema}.child_slots SET live = live + 1 WHERE parent_id = p_parent;
    END IF;
    RETURN QUERY SELECT p_child, true, CASE WHEN v_run THEN p_push END;
END
$$;

-- Register (or re-check) the parent's wait for children p_ids, and suspend
-- the parent unless they have all finished.  Children are locked before the
-- parent (the order a finishing child takes), so the two never deadlock.
-- 'lost' (lease gone), 'resolved' (all finished: go on), 'timed_out', or
-- 'waiting' (suspended: the last child, or the timeout, makes it due).
CREATE FUNCTION {schema}.wait_children(
    p_parent uuid, p_token uuid, p_key text, p_position integer, p_name text,
    p_ids uuid[], p_expires timestamptz, p_started timestamptz, p_time_up boolean,
    p_suspend boolean)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_remaining integer;
    v_resumed integer;
BEGIN
    PERFORM 1 FROM {schema}.runs
    WHERE id = p_parent AND lease_token = p_token
      AND status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting');
    IF NOT FOUND THEN
        RETURN 'lost';
    END IF;
    -- Children cancelled with this parent, which has been resumed since: they
    -- go on too (one whose invocation is still stopping keeps its lease).
    WITH resumed AS (
        UPDATE {schema}.runs
        SET status = 'queued', cancelled_by_parent = false, finished_at = NULL,
            awaited_by = p_key, error = NULL, updated_at = {schema}.clock_now(),
            due_at = CASE WHEN lease_token IS NOT NULL AND due_at > {schema}.clock_now()
                          THEN due_at ELSE {schema}.clock_now() END
        WHERE id = ANY (p_ids) AND parent_id = p_parent AND status = 'cancelled'
          AND cancelled_by_parent
        RETURNING id
    ), logged AS (
        INSERT INTO {schema}.events (run_id, kind, detail)
        SELECT id, 'replayed', jsonb_build_object('reason', 'its parent run was resumed',
                                                 'parent', p_parent)
        FROM resumed
    )
    SELECT count(*) INTO v_resumed FROM resumed;
    IF v_resumed > 0 THEN
        UPDATE {schema}.child_slots SET live = live + v_resumed WHERE parent_id = p_parent;
    END IF;
    SELECT remaining INTO v_remaining FROM {schema}.child_waits
    WHERE parent_id = p_parent AND key = p_key FOR UPDATE;
    IF v_remaining IS NOT NULL AND v_resumed > 0 THEN
        v_remaining := v_remaining + v_resumed;
        UPDATE {schema}.child_waits SET remaining = v_remaining
        WHERE parent_id = p_parent AND key = p_key;
    END IF;
    IF v_remaining IS NULL THEN
        WITH marked AS (
            UPDATE {schema}.runs SET awaited_by = p_key
            WHERE id = ANY (p_ids) AND parent_id = p_parent
              AND status NOT IN ('completed', 'failed', 'cancelled')
            RETURNING 1
        )
        SELECT count(*) INTO v_remaining FROM marked;
        INSERT INTO {schema}.child_waits (parent_id, key, remaining)
        VALUES (p_parent, p_key, v_remaining);
        INSERT INTO {schema}.steps (run_id, key, position, name, kind, status, input, output,
                                    attempts, started_at, wake_at)
        VALUES (p_parent, p_key, p_position, p_name, 'children', 'waiting', NULL,
                to_json(p_ids), 1, p_started, p_expires)
        ON CONFLICT (run_id, key) DO NOTHING;
    END IF;
    IF v_remaining <= 0 THEN
        RETURN 'resolved';
    END IF;
    IF p_time_up THEN
        RETURN 'timed_out';
    END IF;
    IF NOT p_suspend THEN  -- a wait inside parallel branches (see suspend_for_children)
        RETURN 'pending';
    END IF;
    UPDATE {schema}.runs
    SET status = 'waiting', lease_token = NULL, due_at = p_expires, executing = false,
        lost_attempts = 0, step_key = NULL, step_attempt = 0,
        updated_at = {schema}.clock_now()
    WHERE id = p_parent AND lease_token = p_token;
    IF NOT FOUND THEN
        RETURN 'lost';
    END IF;
    RETURN 'waiting';
END
$$;

-- Parallel branches each waiting for their children (registered with
-- p_suspend = false): suspend the parent unless one of those waits is
-- resolved already; then return their keys (the branches go on).  NULL: the
-- lease is lost.  The first of the waits to resolve makes the parent due.
CREATE FUNCTION {schema}.suspend_for_children(
    p_parent uuid, p_token uuid, p_keys text[], p_due timestamptz)
RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    v_done text[];
BEGIN
    PERFORM 1 FROM {schema}.runs
    WHERE id = p_parent AND lease_token = p_token
      AND status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting');
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM {schema}.child_waits
    WHERE parent_id = p_parent AND key = ANY (p_keys) ORDER BY key FOR UPDATE;
    SELECT coalesce(array_agg(key ORDER BY key), '{}') INTO v_done
    FROM {schema}.child_waits
    WHERE parent_id = p_parent AND key = ANY (p_keys) AND remaining <= 0;
    IF cardinality(v_done) > 0 THEN
        RETURN v_done;
    END IF;
    UPDATE {schema}.runs
    SET status = 'waiting', lease_token = NULL, due_at = p_due, executing = false,
        lost_attempts = 0, step_key = NULL, step_attempt = 0,
        updated_at = {schema}.clock_now()
    WHERE id = p_parent AND lease_token = p_token;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN '{}';
END
$$;

-- A child has finished: free its slot (the oldest held sibling takes it), and
-- count it off the parent's wait; the last one makes the parent due.
CREATE FUNCTION {schema}.child_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_left integer;
BEGIN
    IF NOT (OLD.status = 'queued' AND OLD.due_at IS NULL AND OLD.invocations = 0) THEN
        UPDATE {schema}.runs SET due_at = {schema}.clock_now(), updated_at = {schema}.clock_now()
        WHERE id = (SELECT h.id FROM {schema}.runs h
                    WHERE h.parent_id = NEW.parent_id AND h.status = 'queued'
                      AND h.due_at IS NULL
                    ORDER BY h.created_at, h.id LIMIT 1 FOR UPDATE SKIP LOCKED);
        IF NOT FOUND THEN
            UPDATE {schema}.child_slots SET live = greatest(live - 1, 0)
            WHERE parent_id = NEW.parent_id;
        END IF;
    END IF;
    IF NEW.awaited_by IS NOT NULL THEN
        UPDATE {schema}.child_waits SET remaining = remaining - 1
        WHERE parent_id = NEW.parent_id AND key = NEW.awaited_by
        RETURNING remaining INTO v_left;
        IF v_left = 0 THEN
            UPDATE {schema}.runs SET due_at = {schema}.clock_now()
            WHERE id = NEW.parent_id AND status = 'waiting';
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER runs_child_finished
    AFTER UPDATE OF status ON {schema}.runs
    FOR EACH ROW
    WHEN (NEW.parent_id IS NOT NULL
          AND NEW.status IN ('completed', 'failed', 'cancelled')
          AND OLD.status NOT IN ('completed', 'failed', 'cancelled'))
    EXECUTE FUNCTION {schema}.child_finished();

-- A cancelled parent cancels its live children (those started with
-- cancel_with_parent), as cancel_run does: one executing now keeps its lease
-- until its step has stopped.  Theirs follow through this same trigger.
CREATE FUNCTION {schema}.cancel_children() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH c AS (
        UPDATE {schema}.runs
        SET status = 'cancelled', cancelled_by_parent = true,
            lease_token = CASE WHEN executing AND due_at > {schema}.clock_now()
                               THEN lease_token END,
            due_at = CASE WHEN executing AND due_at > {schema}.clock_now() THEN due_at END,
            finished_at = {schema}.clock_now(), updated_at = {schema}.clock_now()
        WHERE parent_id = NEW.id AND cancel_with_parent
          AND status IN ('queued', 'running', 'sleeping', 'retrying', 'waiting')
        RETURNING id, lease_token IS NOT NULL AS stopping
    )
    INSERT INTO {schema}.events (run_id, kind, detail)
    SELECT c.id, 'cancelled',
           jsonb_build_object('reason', 'its parent run was cancelled', 'parent', NEW.id)
           || CASE WHEN c.stopping THEN '{"stopping": true}'::jsonb ELSE '{}'::jsonb END
    FROM c;
    RETURN NULL;
END
$$;

CREATE TRIGGER runs_cancel_children
    AFTER UPDATE OF status ON {schema}.runs
    FOR EACH ROW
    WHEN (NEW.status = 'cancelled' AND OLD.status <> 'cancelled')
    EXECUTE FUNCTION {schema}.cancel_children();
