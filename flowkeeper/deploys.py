"""Rolling deploys: a run whose workflow this process does not know waits for one that does.

During a rolling deploy, new code triggers a workflow that instances still on
the old code do not have; any of them may receive the invocation.  Such an
instance does not fail the run: it *defers* it — the lease is released, the
run is due again after an exponential backoff (5 s, 10 s, ... at most 5 min)
and keeps the status it had (queued, sleeping, retrying stay live) — and
records why as a ``workflow_unknown`` event.  The next invocation that lands
on an instance knowing the workflow executes it normally.

An *episode* starts the first time an endpoint did not know the run's
workflow and lasts while nothing else invoked the run: an invocation that
executed it in between (a newer instance) ends the episode, so a run that
slept for a week gets its own grace.  After ``unknown_workflow_grace``
(``FlowKeeper(...)``, a day by default) of one episode the run fails with
:class:`~flowkeeper.errors.UnknownWorkflowError`, and the failure alert
fires.

The episode's state is the latest ``workflow_unknown`` event's detail (see
``sql/deploys.sql``): a new event on the 1st, 2nd, 4th, 8th... deferral of
an episode, in between the latest one brought up to date.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .store import ClaimedRun, EventRecord, Store

logger = logging.getLogger("flowkeeper")

#: The first deferral's wait, and the longest, in seconds.
FIRST_DEFERRAL = 5.0
LONGEST_DEFERRAL = 300.0
#: At most this many of the names this process knows are recorded per event.
_KNOWN_SHOWN = 50

EVENT = "workflow_unknown"


def deferral_backoff(occurrence: int, *, rng: random.Random | None = None) -> float:
    """Seconds before the ``occurrence``-th deferral of an episode (1-based) is tried again."""
    exponent = min(max(occurrence, 1) - 1, 16)
    base = min(LONGEST_DEFERRAL, FIRST_DEFERRAL * 2.0**exponent)
    return min(LONGEST_DEFERRAL, base * (rng or random).uniform(0.8, 1.2))


def resumed_status(claimed: ClaimedRun) -> str:
    """The status the run had before this invocation's claim made it 'running'."""
    if claimed.step_key is not None:
        return "retrying"
    if not claimed.history:
        return "queued"
    if claimed.history[-1].kind == "sleep":
        return "sleeping"
    return "running"  # handed on mid-run, or its last invocation died


@dataclass(frozen=True, slots=True)
class Deferral:
    """A run given back because this process does not know its workflow."""

    workflow: str
    known: list[str]
    status: str
    since: datetime
    occurrences: int
    retry_in: float
    retry_at: datetime | None
    fails_at: datetime
    message: str

    def as_json(self) -> dict[str, Any]:
        return {
            "reason": "unknown_workflow",
            "workflow": self.workflow,
            "known": self.known,
            "message": self.message,
            "since": self.since.isoformat(),
            "occurrences": self.occurrences,
            "retry_in": round(self.retry_in, 3),
            "retry_at": self.retry_at.isoformat() if self.retry_at else None,
            "fails_at": self.fails_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class GraceOver:
    """The episode outlasted the grace period: the run is to fail."""

    workflow: str
    known: list[str]
    since: datetime
    occurrences: int
    grace: timedelta

    @property
    def note(self) -> str:
        return (
            f"No endpoint that received this run knew workflow {self.workflow!r} for "
            f"{_span(self.grace)} (since {self.since.isoformat(timespec='seconds')}, "
            f"{self.occurrences} invocation(s)), the unknown_workflow_grace; the run failed. "
            "Deploy the code that defines it, then replay the run."
        )

    def event(self) -> EventRecord:
        return EventRecord(
            EVENT,
            detail={
                "workflow": self.workflow,
                "known": self.known[:_KNOWN_SHOWN],
                "since": self.since.isoformat(),
                "occurrences": self.occurrences,
                "grace": self.grace.total_seconds(),
                "failed": True,
                "message": self.note,
            },
        )


def _message(workflow: str, known: list[str]) -> str:
    names = ", ".join(known[:_KNOWN_SHOWN]) + (", ..." if len(known) > _KNOWN_SHOWN else "")
    return (
        f"The endpoint that received this run does not know workflow {workflow!r} "
        f"(it knows: {names or 'no workflow at all'}): an instance still on older code during "
        "a deploy, or a module not imported there. The run waits for an instance that "
        "knows it."
    )


def _span(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds >= 86400 and seconds % 3600 == 0:
        return f"{seconds / 86400:g} day(s)"
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} hour(s)"
    return f"{seconds:g} s"


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


async def defer(
    store: Store,
    claimed: ClaimedRun,
    *,
    known: list[str],
    grace: timedelta,
    rng: random.Random | None = None,
) -> Deferral | GraceOver | None:
    """Defer the claimed run, or say its grace is over.  None: the lease was lost."""
    now, event_id, last = await store.unknown_workflow_episode(claimed.run_id)
    last = last or {}
    since = _parse_time(last.get("since"))
    counted = last.get("occurrences")
    if (
        since is not None
        and isinstance(counted, int)
        and not last.get("failed")
        # Only this invocation's own claim since the last deferral: no instance
        # executed the run in between, so this is the same episode.
        and last.get("invocation") == claimed.invocations - 1
    ):
        occurrences = counted + 1
        first = last["occurrence"] if isinstance(last.get("occurrence"), int) else 1
    else:
        since, occurrences, first = now, 1, 1
    fails_at = since + grace
    if now >= fails_at:
        return GraceOver(claimed.workflow, known, since, occurrences, grace)
    logged = occurrences & (occurrences - 1) == 0  # the 1st, 2nd, 4th, 8th...
    if logged:
        event_id, first = None, occurrences
    delay = min(deferral_backoff(occurrences, rng=rng), (fails_at - now).total_seconds())
    status = resumed_status(claimed)
    message = _message(claimed.workflow, known)
    detail = {
        "workflow": claimed.workflow,
        "known": known[:_KNOWN_SHOWN],
        "status": status,
        "since": since.isoformat(),
        "occurrence": first,
        "occurrences": occurrences,
        "invocation": claimed.invocations,
        "retry_in": round(delay, 3),
        "fails_at": fails_at.isoformat(),
        "message": message,
    }
    due = await store.defer_unknown_workflow(
        claimed.run_id,
        claimed.lease_token,
        status=status,
        delay=delay,
        detail=detail,
        event_id=event_id,
        not_after=fails_at,
    )
    if due is None:
        return None
    return Deferral(
        workflow=claimed.workflow,
        known=known[:_KNOWN_SHOWN],
        status=status,
        since=since,
        occurrences=occurrences,
        retry_in=delay,
        retry_at=due,
        fails_at=fails_at,
        message=message,
    )


def describe(detail: dict[str, Any] | None) -> str:
    """A ``workflow_unknown`` event in words (``flowkeeper runs show``)."""
    d = detail or {}
    message = str(d.get("message") or "The endpoint did not know the run's workflow.")
    if d.get("failed"):
        return message
    parts = [message]
    if d.get("retry_at"):
        parts.append(f"tries again at {d['retry_at']}")
    if d.get("fails_at"):
        parts.append(f"fails after {d['fails_at']}")
    if isinstance(d.get("occurrences"), int) and d["occurrences"] > 1:
        parts.append(f"{d['occurrences']} times since {d.get('since')}")
    return " · ".join(parts)
