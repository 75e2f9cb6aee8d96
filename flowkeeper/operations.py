"""Operating on runs after the fact: list them, replay, retry (dashboard, runs CLI).

A mixin of :class:`flowkeeper.FlowKeeper`: these methods use its store,
registry and dispatcher, and push replayed runs the way triggers do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from .errors import RunNotFoundError, RunStateError
from .ids import check_run_id
from .models import RunHandle, RunStatus
from .patches import PatchBranches, check_id, key_of, live_branches
from .runlist import RunFilter, RunPage, RunSummary
from .serialization import json_or_none

if TYPE_CHECKING:
    from .client import FlowKeeper
    from .dispatch import Dispatcher
    from .store import Store
    from .workflow import Registry

logger = logging.getLogger("flowkeeper")


class RunOperations:
    """Listing, replay and retry of runs (methods of :class:`FlowKeeper`)."""

    store: Store
    registry: Registry
    dispatcher: Dispatcher | None
    dispatch_lease: timedelta

    if TYPE_CHECKING:

        async def _push(self, run_id: str, token: uuid.UUID) -> None: ...

    async def list_runs(self, filter: RunFilter | None = None, **criteria: Any) -> RunPage:
        """A page of runs, newest first, with the counts per status.

        Pass a :class:`RunFilter` or its fields as keywords (``workflow=``,
        ``status=``, ``since="2h"``, ``until=``, ``search=`` run id or
        idempotency key, ``before=`` cursor, ``limit=``).  The counts cover the
        workflow and time range, whatever the status, search and cursor.
        ``page.next_before`` is the cursor of the next (older) page, if any.
        """
        f = filter if filter is not None else RunFilter.build(**criteria)
        low, high = f.id_range()
        ids = await self.store.list_run_ids(
            low,
            high,
            f.limit + 1,
            workflow=f.workflow,
            status=f.status.value if f.status else None,
            search=f.search_terms() if f.search else None,
        )
        more = len(ids) > f.limit
        ids = ids[: f.limit]
        runs = [_summary(r) for r in await self.store.run_summaries(ids)]
        count_low, count_high = dataclasses.replace(f, before=None).id_range()
        counts = await self.store.count_runs(count_low, count_high, workflow=f.workflow)
        return RunPage(runs=runs, counts=counts, next_before=str(ids[-1]) if more else None)

    async def patch_branches(self, patch: str | None = None) -> list[PatchBranches]:
        """How many live runs took each branch of each ``ctx.patched`` id (or of ``patch``).

        When ``old`` is 0 for a patch, no live run needs the old branch any
        more: replace the ``if`` with ``ctx.deprecate_patch``.  For one
        ``patch``, ``unreached`` counts live runs not at the check yet.
        """
        return await live_branches(self.store, patch)

    async def patch_runs(self, patch: str, *, old: bool = True, limit: int = 50) -> list[str]:
        """Ids of live runs on the old (or new) branch of ``patch``, newest first."""
        rows = await self.store.patch_runs(key_of(check_id(patch)), not old, max(1, limit))
        return [str(r["id"]) for r in rows]

    async def list_workflows(self) -> list[str]:
        """Workflow names that have runs, and those registered in this process."""
        return sorted(set(await self.store.list_workflows()) | set(self.registry.names()))

    async def run_version(self, run_id: str) -> str | None:
        """A short value that changes whenever the run or its history changes (None: no run).

        Live views poll this and fetch the whole run only when it moved.
        """
        row = await self.store.run_version(check_run_id(run_id))
        if row is None:
            return None
        return f"{row['status']}:{row['updated_at'].timestamp():.6f}:{row['last_event'] or 0}"

    async def replay(
        self,
        run_id: str,
        from_step: str | None = None,
        *,
        reason: str | None = None,
        actor: str = "api",
    ) -> RunHandle:
        """Run a finished run again from ``from_step``: it and every later step run
        again; the results of earlier steps are kept.

        Without ``from_step``: a failed run replays from the step that failed, a
        cancelled run resumes where it stopped; a completed run needs the step
        named.  A live run is refused (:class:`RunStateError`): cancel it first,
        so no invocation is executing steps while its history is rewritten.  The
        replay is recorded on the run's history (event ``replayed``) and the run
        is pushed to the endpoint at once when this process has its URL.
        """
        rid = check_run_id(run_id)
        token = await self._replay(rid, from_step, kind="replayed", reason=reason, actor=actor)
        if token is not None:
            await self._push(rid, token)
        return RunHandle(
            run_id=rid,
            workflow=await self._workflow_of(rid),
            created=False,
            _fk=cast("FlowKeeper", self),
        )

    async def fork(
        self,
        run_id: str,
        from_step: str | None = None,
        *,
        reason: str | None = None,
        actor: str = "api",
    ) -> RunHandle:
        """Start a new run that copies ``run_id``'s history before ``from_step``.

        The original is left untouched (for audit); the new run executes
        ``from_step`` and everything after it, with the same input.  Without
        ``from_step``: a failed run forks from its failed step, a cancelled
        one from the end of its history; a completed or live run needs the
        step named.  Recorded as a ``forked`` event on the new run, which is
        pushed at once when this process has the endpoint's URL.
        """
        from .fork import fork

        rid = check_run_id(run_id)
        push = self.dispatcher is not None
        token = uuid.uuid4() if push else None
        new_id, workflow, copied = await fork(
            self.store,
            self.registry,
            rid,
            from_step,
            lease_token=token,
            lease=self.dispatch_lease if push else timedelta(0),
            reason=reason,
            actor=actor,
        )
        logger.info(
            "run %s forked from run %s at %s (%d record(s) copied) by %s",
            new_id,
            rid,
            from_step or "its default point",
            copied,
            actor,
        )
        if token is not None:
            await self._push(new_id, token)
        return RunHandle(
            run_id=new_id, workflow=workflow, created=True, _fk=cast("FlowKeeper", self)
        )

    async def retry(self, run_id: str, *, reason: str | None = None, actor: str = "api") -> bool:
        """Retry now: a failed run runs again from its failed step; a run waiting for a
        step's retry stops waiting.  Recorded as a ``retried`` event.

        Returns False when a dispatcher was already delivering the waiting run's
        retry (nothing to do); raises :class:`RunStateError` for other statuses.
        """
        rid = check_run_id(run_id)
        state = await self.store.run_status(rid)
        if state is None:
            raise RunNotFoundError(run_id)
        status = state["status"]
        if status == "failed":
            token = await self._replay(rid, None, kind="retried", reason=reason, actor=actor)
            if token is not None:
                await self._push(rid, token)
            return True
        if status != "retrying":
            raise RunStateError(
                rid,
                status,
                f"Run {rid} is {status}: retry applies to a failed run or to one waiting for "
                "a step's retry. Use replay to run a completed or cancelled run again.",
            )
        push = self.dispatcher is not None
        token = uuid.uuid4() if push else None
        retried = await self.store.retry_now(
            rid,
            detail={"by": actor, "reason": reason, "previous_status": status},
            lease_token=token,
            lease=self.dispatch_lease if push else timedelta(0),
        )
        if retried and token is not None:
            await self._push(rid, token)
        return retried

    async def replay_failed(
        self,
        workflow: str,
        *,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        limit: int = 1000,
        reason: str | None = None,
        actor: str = "api",
    ) -> list[str]:
        """Replay every failed run of ``workflow`` (oldest first, at most ``limit``)
        from its failed step; return their ids.  Each one is recorded on its history.
        """
        f = RunFilter.build(workflow=workflow, since=since, until=until)
        low, high = f.id_range()
        ids = await self.store.failed_run_ids(workflow, low, high, max(1, limit))
        replayed: list[tuple[str, uuid.UUID | None]] = []
        detail_reason = reason or f"bulk replay of the failed runs of {workflow}"
        for rid in ids:
            try:
                token = await self._replay(
                    rid, None, kind="replayed", reason=detail_reason, actor=actor
                )
            except RunStateError as exc:  # replayed or deleted meanwhile
                logger.info("bulk replay: skipped run %s (%s)", rid, exc)
                continue
            replayed.append((rid, token))
        semaphore = asyncio.Semaphore(16)

        async def push(rid: str, token: uuid.UUID) -> None:
            async with semaphore:
                await self._push(rid, token)

        await asyncio.gather(*(push(r, t) for r, t in replayed if t is not None))
        return [r for r, _ in replayed]

    async def _replay(
        self, rid: str, from_step: str | None, *, kind: str, reason: str | None, actor: str
    ) -> uuid.UUID | None:
        """Reset a finished run; return the lease token to push it with (None: left due)."""
        rows = await self.store.get_run(rid)
        if rows is None:
            raise RunNotFoundError(rid)
        run, steps, _ = rows
        status = run["status"]
        if status not in ("completed", "failed", "cancelled"):
            raise RunStateError(
                rid,
                status,
                f"Run {rid} is {status}: only a finished run can be replayed. Cancel it first "
                "(fk.cancel, `flowkeeper runs cancel`, or the dashboard), then replay it.",
            )
        if run["leased"]:
            # Cancelled while a step was executing, and that invocation has not
            # stopped yet: replaying now could run the step twice at once.
            wait = max(0.0, (run["due_at"] - await self.store.clock_now()).total_seconds())
            raise RunStateError(
                rid,
                status,
                f"Run {rid} was cancelled while a step was executing, and its invocation has "
                "not stopped yet (a sync step cannot be interrupted: it holds the run until "
                f"it returns). Try again in {wait:.0f} s; if that step is still running then, "
                "it is still held.",
            )
        error = json_or_none(run["error"])
        position, key = _replay_point(rid, status, error, steps, from_step)
        push = self.dispatcher is not None
        token = uuid.uuid4() if push else None
        detail = {
            "from_step": key,
            "position": position,
            "previous_status": status,
            "previous_error": (
                {"type": error.get("type"), "message": error.get("message")} if error else None
            ),
            "by": actor,
            "reason": reason,
        }
        replayed, forgotten = await self.store.replay(
            rid,
            position,
            kind=kind,
            step_key=key,
            detail=detail,
            lease_token=token,
            lease=self.dispatch_lease if push else timedelta(0),
        )
        if not replayed:
            raise RunStateError(
                rid,
                None,
                f"Run {rid} changed while it was being replayed, or an invocation still holds "
                "it; look at it again in a few seconds.",
            )
        logger.info(
            "run %s: %s from %s (position %d, %d step record(s) forgotten) by %s",
            rid,
            kind,
            key or "the end of its history",
            position,
            forgotten,
            actor,
        )
        return token

    async def _workflow_of(self, rid: str) -> str:
        row = await self.store.run_status(rid)
        return str(row["workflow"]) if row is not None else ""


def _replay_point(
    rid: str,
    status: str,
    error: dict[str, Any] | None,
    steps: list[Any],
    from_step: str | None,
) -> tuple[int, str | None]:
    """The position (and step key) a replay starts from."""
    end = max((s["position"] for s in steps), default=-1) + 1
    if from_step is not None:
        for s in steps:
            if s["key"] == from_step:
                return s["position"], s["key"]
        known = ", ".join(s["key"] for s in steps) or "none recorded"
        raise RunStateError(
            rid, status, f"Run {rid} has no recorded step {from_step!r} (its steps: {known})."
        )
    if status == "completed":
        raise RunStateError(
            rid,
            status,
            f"Run {rid} completed: say which step to replay it from (from_step=..., "
            "--from-step); that step and every later one run again.",
        )
    if status == "failed":
        failed_key = (error or {}).get("step")
        for s in steps:
            if s["key"] == failed_key:
                return s["position"], s["key"]
        failed = [s for s in steps if s["status"] == "failed"]
        if failed:
            first = min(failed, key=lambda s: s["position"])
            return first["position"], first["key"]
    # Cancelled, or failed outside any recorded step: go on after the recorded history.
    return end, None


def _summary(row: Any) -> RunSummary:
    return RunSummary(
        id=str(row["id"]),
        workflow=row["workflow"],
        status=RunStatus(row["status"]),
        idempotency_key=row["idempotency_key"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        due_at=row["due_at"],
        step_key=row["step_key"],
        step_attempt=row["step_attempt"],
        invocations=row["invocations"],
        steps=row["steps"],
        error_type=row["error_type"],
        error_message=row["error_message"],
        error_step=row["error_step"],
    )
