"""Child runs: ``ctx.start_child``, ``ctx.wait_for_children``, ``ctx.invoke``.

A child is a run of its own (its own invocations, pushed at once like a
trigger, so 1,000 children run on up to 1,000 instances of the app) that
carries its parent's id and the parent's step key that started it.  Two
operations in the parent's history:

- ``child`` (a start): memoized like a step.  The child is inserted under the
  parent's lease, once per (parent, step key) — a unique index, so a replay or
  a duplicate invocation finds the first child instead of starting another.
- ``children`` (a wait): registered in one statement that counts the children
  still running and suspends the parent (no invocation held); each child's
  completion counts itself off in its own finishing transaction, and the last
  one makes the parent due (migration 0010).  Replayed, the wait reads the
  children's outcomes (exact JSON, restored as the child workflow's output
  type when it is registered here).

At most ``max_concurrency`` children of one parent are live at once (default
``FlowKeeper(max_children=100)``); the others are stored held and start as
slots free up.  Cancelling a parent cancels its live children unless they
were started with ``cancel_with_parent=False``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import serialization
from .errors import ChildFailedError, ChildTimeoutError, StepUsageError, UnknownWorkflowError
from .ids import new_run_id
from .store import StepRecord
from .workflow import Workflow

if TYPE_CHECKING:
    from .engine import Execution

_FINISHED = ("completed", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class ChildHandle:
    """A child run started by ``ctx.start_child``: pass it to ``ctx.wait_for_children``."""

    run_id: str
    workflow: str
    key: str  # the parent's history key that started it


def workflow_name(workflow: str | Workflow | Callable[..., Any]) -> str:
    if isinstance(workflow, str):
        return workflow
    if isinstance(workflow, Workflow):
        return workflow.name
    name = getattr(workflow, "__flowkeeper_name__", None) or getattr(workflow, "name", None)
    if isinstance(name, str):
        return name
    raise StepUsageError(
        f"A child workflow is named by its registered name or its Workflow object, got {workflow!r}"
    )


def _limit(value: int | None, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StepUsageError(f"max_concurrency must be a positive int, got {value!r}")
    return value


def _timeout(value: timedelta | float | None) -> timedelta | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | timedelta):
        raise StepUsageError(f"timeout must be a timedelta or seconds, got {value!r}")
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not 0 < seconds < 100 * 365 * 86400:
        raise StepUsageError(f"timeout must be positive and under 100 years, got {value!r}")
    return timedelta(seconds=seconds)


async def start_child(
    execution: Execution,
    name: str,
    workflow: str | Workflow | Callable[..., Any],
    input: Any,
    *,
    cancel_with_parent: bool,
    max_concurrency: int | None,
) -> ChildHandle:
    """Start (once) a child run of ``workflow``; replayed, return the first child's handle."""
    from .engine import _Suspend

    wf_name = workflow_name(workflow)
    engine = execution.engine
    limit = _limit(max_concurrency, engine.max_children)
    key, position, entry = execution._next(name, "child")
    try:
        if entry is not None:
            recorded = json.loads(entry.output or "{}")
            return ChildHandle(str(recorded["run_id"]), str(recorded["workflow"]), key)
        # Checked at the call, before anything is stored: a child this process
        # cannot run is the parent's bug (its own run would then be deferred by
        # the rolling-deploy rule, see flowkeeper.deploys, wherever it lands).
        if wf_name not in engine.registry:
            raise UnknownWorkflowError(wf_name, engine.registry.names())
        input_json = engine.registry.get(wf_name).dump_input(input)
        await execution._before_new_work()
        push = uuid.uuid4() if engine.push is not None else None
        started = execution.db_time()
        try:
            result = await execution.store.start_child(
                execution.run_id,
                execution.token,
                child_id=new_run_id(),
                workflow=wf_name,
                input_json=input_json,
                step_key=key,
                cancel_with_parent=cancel_with_parent,
                limit=limit,
                push_token=push,
                lease=engine.dispatch_lease if push is not None else timedelta(0),
            )
        except Exception as exc:
            raise execution._database_failure(exc) from exc
        if result is None:
            raise _Suspend(await execution._lost())
        child_id, _created, push_token = result
        output = json.dumps({"run_id": child_id, "workflow": wf_name})
        execution._pending_steps.append(
            StepRecord(
                key=key,
                position=position,
                name=name,
                kind="child",
                status="completed",
                input=None,
                output=output,
                output_type=None,
                error=None,
                attempts=1,
                started_at=started,
                finished_at=execution.db_time(),
            )
        )
        await execution._flush_if_branch()
        if push_token is not None and engine.push is not None:
            engine.push(child_id, push_token)
        return ChildHandle(child_id, wf_name, key)
    finally:
        execution._busy = None


async def wait_for_children(
    execution: Execution,
    handles: Sequence[ChildHandle],
    *,
    name: str,
    timeout: timedelta | float | None,
    return_exceptions: bool,
) -> list[Any]:
    """Suspend until every child in ``handles`` has finished; their outputs, in order."""
    from .engine import Outcome, _Suspend

    for handle in handles:
        if not isinstance(handle, ChildHandle):
            raise StepUsageError(
                f"wait_for_children takes the handles ctx.start_child returned, got {handle!r}"
            )
    limit = _timeout(timeout)
    key, position, entry = execution._next(name, "children")
    try:
        ids = [h.run_id for h in handles]
        if entry is not None:
            ids = [str(i) for i in json.loads(entry.output or "[]")]
            expires = entry.wake_at
        else:
            expires = execution.db_time() + limit if limit is not None else None
        await execution._before_new_work()
        while True:
            # Inside parallel branches the wait is registered without suspending;
            # the branch parks, and the run suspends once every branch waits.
            branch = bool(execution._branches)
            time_up = expires is not None and execution.db_time() >= expires
            try:
                outcome = await execution.store.wait_children(
                    execution.run_id,
                    execution.token,
                    key=key,
                    position=position,
                    name=name,
                    child_ids=ids,
                    expires=expires,
                    started=execution.db_time(),
                    time_up=time_up,
                    suspend=not branch,
                )
            except Exception as exc:
                raise execution._database_failure(exc) from exc
            if outcome == "lost":
                raise _Suspend(await execution._lost())
            if outcome == "waiting":
                raise _Suspend(execution._segment(Outcome.WAITING, due_at=expires))
            if outcome != "pending":
                break
            await execution._park(key, "children", expires)
        try:
            rows = {str(r["id"]): r for r in await execution.store.children_results(ids)}
        except Exception as exc:
            raise execution._database_failure(exc) from exc
        results: list[Any] = []
        for child_id in ids:
            row = rows.get(child_id)
            if row is None or row["status"] not in _FINISHED:
                error: BaseException = ChildTimeoutError(
                    key, child_id, row["workflow"] if row else "?", "running", None
                )
                if not return_exceptions:
                    raise error
                results.append(error)
                continue
            if row["status"] == "completed":
                results.append(_output(execution, row["workflow"], row["output"], child_id))
                continue
            failure = ChildFailedError(
                key,
                child_id,
                row["workflow"],
                row["status"],
                json.loads(row["error"]) if row["error"] else None,
            )
            if not return_exceptions:
                raise failure
            results.append(failure)
        return results
    finally:
        execution._busy = None


def _output(execution: Execution, workflow: str, text: str | None, child_id: str) -> Any:
    registry = execution.engine.registry
    if workflow in registry:
        return registry.get(workflow).load_output(text)
    return serialization.loads(text, None, None, what=f"The output of child run {child_id}")
