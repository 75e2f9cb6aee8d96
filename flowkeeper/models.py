"""The public records flowkeeper returns: run states, runs, steps, handles."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import FlowKeeper


class RunStatus(enum.StrEnum):
    """``queued → running → (sleeping | retrying | waiting)* → completed | failed | cancelled``."""

    QUEUED = "queued"
    RUNNING = "running"
    SLEEPING = "sleeping"
    RETRYING = "retrying"
    WAITING = "waiting"  # for an event or an approval token (ctx.wait_for_event/_token)
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_finished(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
LIVE_STATUSES = frozenset(set(RunStatus) - TERMINAL_STATUSES)


@dataclass(frozen=True, slots=True)
class AttemptError:
    """One failed attempt of a step."""

    attempt: int
    error_type: str
    message: str
    traceback: str | None
    started_at: datetime | None
    finished_at: datetime | None
    retry_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StepInfo:
    """A step (or durable sleep) of a run, as recorded."""

    key: str
    name: str
    position: int
    kind: str  # "step" | "sleep"
    status: str  # "completed" | "failed" | "sleeping" | "retrying" (not yet recorded)
    attempts: int
    input: Any = None
    output: Any = None
    error: dict[str, Any] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    wake_at: datetime | None = None
    failed_attempts: list[AttemptError] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RunEvent:
    """Something that happened to a run besides its steps (history)."""

    id: int
    at: datetime
    kind: str
    step_key: str | None
    attempt: int | None
    detail: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run as stored: status, input, output or error, and its steps."""

    id: str
    workflow: str
    status: RunStatus
    input: Any
    output: Any
    error: dict[str, Any] | None
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    due_at: datetime | None
    invocations: int
    steps: list[StepInfo]
    events: list[RunEvent]
    code_version: str | None = None  # the workflow's version= when the run was started

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished


@dataclass(frozen=True, slots=True)
class TickResult:
    """What one scheduler tick did.

    ``errors`` counts the failed dispatches by reason (the endpoint refused,
    could not be reached...); each of those runs is due again after a backoff.
    """

    claimed: int = 0
    dispatched: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class RunHandle:
    """Returned by ``fk.trigger``: the run's id and shortcuts to follow it."""

    run_id: str
    workflow: str
    created: bool
    _fk: FlowKeeper = field(repr=False)

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to finish and return its output (see ``fk.result``)."""
        return await self._fk.result(self.run_id, timeout=timeout)

    async def info(self) -> RunInfo:
        """The run as stored now (see ``fk.get_run``)."""
        return await self._fk.get_run(self.run_id)

    async def cancel(self) -> bool:
        """Cancel the run (see ``fk.cancel``)."""
        return await self._fk.cancel(self.run_id)

    def __str__(self) -> str:
        return self.run_id
