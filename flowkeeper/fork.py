"""``fk.fork(run_id, from_step=...)``: replay as a new run, the original kept for audit.

Replay in place (``fk.replay``) rewrites a run's history from a step on.
A fork instead starts a *new* run of the same workflow with the same input,
whose history is a copy of the original's before that step (patch markers
included, so it takes the same branches): the steps before it are not run
again, that step and every later one run in the new run.  The original is
not changed at all; the new run's ``forked`` event names it.  Like DBOS's
``fork_workflow``.

Which step: ``from_step`` (a recorded step's key), else for a failed run the
step that failed, for a cancelled one the end of its history; a completed
or live run needs the step named.  The source may be live (its history
before the step is final): only a fork past a wait still waiting is refused.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import TYPE_CHECKING

from .errors import RunNotFoundError, RunStateError
from .ids import new_run_id
from .serialization import json_or_none

if TYPE_CHECKING:
    from .store import Store
    from .workflow import Registry

FINISHED = ("completed", "failed", "cancelled")


async def fork(
    store: Store,
    registry: Registry,
    run_id: str,
    from_step: str | None,
    *,
    lease_token: uuid.UUID | None,
    lease: timedelta,
    reason: str | None,
    actor: str,
) -> tuple[str, str, int]:
    """Create the fork; (its run id, the workflow, the steps copied)."""
    from .operations import _replay_point

    rows = await store.get_run(run_id)
    if rows is None:
        raise RunNotFoundError(run_id)
    run, steps, _ = rows
    status = run["status"]
    if from_step is None and status not in FINISHED:
        raise RunStateError(
            run_id,
            status,
            f"Run {run_id} is {status}: say which step the fork starts from (from_step=..., "
            "--from-step); the steps before it are copied, it and every later one run again.",
        )
    position, key = _replay_point(run_id, status, json_or_none(run["error"]), steps, from_step)
    pending = [s["key"] for s in steps if s["position"] < position and s["status"] == "waiting"]
    if pending:
        raise RunStateError(
            run_id,
            status,
            f"Run {run_id} is still waiting in {pending[0]!r}, before the step the fork would "
            "start from: fork from that wait or an earlier step, or once it has resolved.",
        )
    workflow = str(run["workflow"])
    version = registry.get(workflow).version if workflow in registry else run["code_version"]
    new_id = new_run_id()
    detail = {
        "from_run": run_id,
        "from_step": key,
        "position": position,
        "source_status": status,
        "by": actor,
        "reason": reason,
    }
    created, copied = await store.fork_run(
        new_id,
        run_id,
        position,
        detail=detail,
        lease_token=lease_token,
        lease=lease,
        code_version=version,
    )
    if created is None:  # pragma: no cover - deleted between the read and the fork
        raise RunNotFoundError(run_id)
    return created, workflow, copied
