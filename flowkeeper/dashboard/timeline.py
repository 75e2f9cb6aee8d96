"""A run's timeline: one lane per step, one span per attempt, sleeps and waits.

Built from :class:`~flowkeeper.models.RunInfo` (the recorded steps and the
``attempt_failed`` and ``attempt_lost`` events), so the dashboard draws it and ``flowkeeper runs
show`` prints it from the same spans.

Span kinds and outcomes:

``attempt``  an execution of a step body: ``completed`` or ``failed``
``wait``     the backoff between a failed attempt and its retry
``sleep``    a durable sleep (``sleeping`` while it lasts, then ``completed``)
``running``  the step being executed right now (open-ended, up to "now")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..models import RunInfo, StepInfo

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

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "outcome": self.outcome,
            "start": self.start.isoformat(),
            "end": self.end.isoformat() if self.end else None,
            "attempt": self.attempt,
            "error": self.error,
        }


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
            lane.spans.append(Span("wait", "waiting", failure.finished_at, failure.retry_at))
    if step.status == "completed" and step.started_at is not None:
        lane.spans.append(
            Span("attempt", "completed", step.started_at, step.finished_at, step.attempts)
        )
    return lane


def build(info: RunInfo, now: datetime) -> Timeline:
    """The timeline of ``info`` as of the database time ``now``."""
    live = info.status.value not in _TERMINAL
    lanes = [_step_lane(step) for step in info.steps]
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
