"""A run's timeline: one lane per step, one span per attempt, sleeps and waits.

Built from :class:`~flowkeeper.models.RunInfo` (the recorded steps and the
``attempt_failed`` and ``attempt_lost`` events) and the run's
:class:`~flowkeeper.eventops.WaitInfo` records, so the dashboard draws it and
``flowkeeper runs show`` prints it from the same spans.

Span kinds and outcomes:

``attempt``  an execution of a step body: ``completed`` or ``failed``
``backoff``  the wait between a failed attempt and its retry (``waiting``)
``sleep``    a durable sleep (``sleeping`` while it lasts, then ``completed``)
``wait``     a ``ctx.wait_for_event`` / ``ctx.wait_for_token``: ``waiting`` (open-ended,
             up to "now"), ``completed`` (resolved; ``event`` is the event's number),
             ``timed_out``, or ``cancelled``/``ended`` when the run ended while it waited;
             ``label`` says what it awaits and ``until`` when it times out
``running``  the step being executed right now (open-ended, up to "now")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..eventops import match_text
from ..models import RunInfo, StepInfo

if TYPE_CHECKING:
    from ..eventops import WaitInfo

_TERMINAL = {"completed", "failed", "cancelled"}
_MARKED_EVENTS = {
    "replayed",
    "retried",
    "cancelled",
    "stopped",
    "step_hung",
    "alert_sent",
    "alert_failed",
    "workflow_unknown",  # deferred by an endpoint without the workflow (flowkeeper.deploys)
}


@dataclass(frozen=True, slots=True)
class Span:
    kind: str
    outcome: str
    start: datetime
    end: datetime | None  # None: still open at "now"
    attempt: int | None = None
    error: str | None = None
    label: str | None = None  # a wait: what it awaits
    until: datetime | None = None  # a wait: when it times out
    event: int | None = None  # a wait: the number of the event that resolved it

    def as_json(self) -> dict[str, Any]:
        data = {
            "kind": self.kind,
            "outcome": self.outcome,
            "start": self.start.isoformat(),
            "end": self.end.isoformat() if self.end else None,
            "attempt": self.attempt,
            "error": self.error,
        }
        if self.kind == "wait":
            data["label"] = self.label
            data["until"] = self.until.isoformat() if self.until else None
            data["event"] = self.event
        return data


@dataclass(slots=True)
class Lane:
    key: str
    kind: str
    status: str
    position: int | None
    spans: list[Span] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind,
            "status": self.status,
            "position": self.position,
            "spans": [s.as_json() for s in self.spans],
        }


@dataclass(frozen=True, slots=True)
class Timeline:
    start: datetime
    end: datetime
    now: datetime
    live: bool
    lanes: list[Lane]
    markers: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "now": self.now.isoformat(),
            "live": self.live,
            "lanes": [lane.as_json() for lane in self.lanes],
            "markers": self.markers,
        }


def _step_lane(step: StepInfo) -> Lane:
    lane = Lane(step.key, step.kind, step.status, step.position)
    if step.kind == "sleep":
        if step.started_at is not None:
            outcome = "sleeping" if step.status == "sleeping" else "completed"
            lane.spans.append(Span("sleep", outcome, step.started_at, step.wake_at))
        return lane
    for failure in step.failed_attempts:
        start = failure.started_at or failure.finished_at
        if start is None:
            continue
        error = f"{failure.error_type}: {failure.message}"
        lane.spans.append(
            Span("attempt", "failed", start, failure.finished_at, failure.attempt, error)
        )
        if failure.retry_at is not None and failure.finished_at is not None:
            lane.spans.append(Span("backoff", "waiting", failure.finished_at, failure.retry_at))
    if step.status == "completed" and step.started_at is not None:
        lane.spans.append(
            Span("attempt", "completed", step.started_at, step.finished_at, step.attempts)
        )
    return lane


def _wait_lane(step: StepInfo, wait: WaitInfo | None, info: RunInfo) -> Lane:
    """A wait: one span from its start to its resolution, its timeout, or "now"."""
    lane = Lane(step.key, "wait", step.status, step.position)
    start = step.started_at or (wait.started_at if wait else None)
    if start is None:
        return lane
    until = (wait.timeout_at if wait else None) or step.wake_at
    end: datetime | None
    if step.status in ("completed", "timed_out"):
        outcome, end = step.status, step.finished_at or until
    elif info.status.value in _TERMINAL:  # the run ended while it waited (cancelled)
        outcome = "cancelled" if info.status.value == "cancelled" else "ended"
        end = info.finished_at or info.updated_at
        lane.status = outcome
    else:
        outcome, end = "waiting", None
    label = wait.describe() if wait is not None else _label_from_input(step)
    number = wait.event_number if wait is not None and wait.outcome == "event" else None
    lane.spans.append(Span("wait", outcome, start, end, label=label, until=until, event=number))
    return lane


def _label_from_input(step: StepInfo) -> str:
    """What a wait awaits, from its history entry alone (its waits record is gone)."""
    recorded = step.input if isinstance(step.input, dict) else {}
    if recorded.get("kind") == "token":
        return f"approval token {step.name.removeprefix('approval:')}"
    event = str(recorded.get("event") or step.name)
    match = recorded.get("match")
    return f"{event} {match_text(match)}" if isinstance(match, dict) and match else event


def build(info: RunInfo, now: datetime, waits: Sequence[WaitInfo] = ()) -> Timeline:
    """The timeline of ``info`` (with the run's ``waits``) as of the database time ``now``."""
    live = info.status.value not in _TERMINAL
    by_key = {w.key: w for w in waits if w.kind != "cancel"}
    lanes = [
        _wait_lane(step, by_key.get(step.key), info) if step.kind == "wait" else _step_lane(step)
        for step in info.steps
    ]
    if info.status.value == "running":
        # The step being executed is written when it ends: show where the run is.
        ends = [s.end or s.start for lane in lanes for s in lane.spans]
        since = max([*ends, info.started_at or info.created_at])
        lane = Lane("(executing)", "step", "running", None)
        lane.spans.append(Span("running", "running", min(since, now), None))
        lanes.append(lane)
    markers = [
        {"at": e.at.isoformat(), "kind": e.kind, "step_key": e.step_key}
        for e in info.events
        if e.kind in _MARKED_EVENTS
    ]
    start = info.created_at
    points = [start, now if live else (info.finished_at or info.updated_at)]
    for lane in lanes:
        for span in lane.spans:
            points.append(span.start)
            if span.end is not None:
                points.append(span.end)
    end = max(points)
    return Timeline(start=start, end=end, now=now, live=live, lanes=lanes, markers=markers)
