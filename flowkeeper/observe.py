"""Observers: how step logs, tracing and metrics see the engine, at a few marked points.

The engine calls a :class:`Observed` (one per execution of a run) at exactly
these points, each marked ``# observe:`` in flowkeeper/engine.py:

- around the whole invocation (``Observed.invocation``), which also sets the
  run scope (:data:`SCOPE`: run id, workflow, step) for everything the
  invocation does;
- when a step attempt's body starts and ends (``attempt_started`` /
  ``attempt_ended``), the scope then naming the step and attempt;
- when a sleep or a wait is reached (``note``).

With no observer registered every call returns at once: the engine pays one
attribute check per point.  Observers are plain objects (:class:`Observer`);
an exception raised by one is logged and never reaches the run.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import SegmentResult
    from .store import ClaimedRun

logger = logging.getLogger("flowkeeper")


@dataclass(slots=True)
class Invocation:
    """One invocation's segment of one run, as observers see it."""

    run_id: str
    workflow: str
    claimed: ClaimedRun
    started: float = field(default_factory=time.monotonic)
    #: Per-observer state, keyed by the observer (or anything it likes).
    state: dict[Any, Any] = field(default_factory=dict)
    #: The trace context the invocation arrived with (W3C headers), if any.
    trace: dict[str, str] | None = None


@dataclass(slots=True)
class Attempt:
    """One attempt of one step, while its body runs."""

    key: str
    attempt: int
    is_async: bool
    started: float = field(default_factory=time.monotonic)
    state: dict[Any, Any] = field(default_factory=dict)
    token: contextvars.Token[Scope | None] | None = None

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


@dataclass(frozen=True, slots=True)
class Scope:
    """What runs now: the run, and the step attempt if inside one."""

    invocation: Invocation
    step: str | None = None
    attempt: int | None = None

    @property
    def run_id(self) -> str:
        return self.invocation.run_id

    @property
    def workflow(self) -> str:
        return self.invocation.workflow


#: The run (and step) the current code executes for; None outside any run.
SCOPE: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "flowkeeper_scope", default=None
)

#: Trace context an invocation arrived with (set by the endpoint around execution).
INCOMING_TRACE: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "flowkeeper_incoming_trace", default=None
)


@contextlib.contextmanager
def incoming_trace(carrier: dict[str, str] | None) -> Iterator[None]:
    """Executions started inside see ``carrier`` as the trace context they arrived with."""
    token = INCOMING_TRACE.set(carrier)
    try:
        yield
    finally:
        INCOMING_TRACE.reset(token)


def current() -> Scope | None:
    """The run scope of the calling code (None outside a run)."""
    return SCOPE.get()


class Observer:
    """Base class: every hook does nothing.  Override the ones you need."""

    async def invocation_started(self, inv: Invocation) -> None:
        """Called in the invocation's task before the workflow function runs."""

    async def invocation_ended(
        self, inv: Invocation, result: SegmentResult | None, error: BaseException | None
    ) -> None:
        """Called once the segment is over (``error``: the engine raised, e.g. lost database)."""

    def attempt_started(self, inv: Invocation, attempt: Attempt) -> None:
        """Called just before a step attempt's body starts (in the step's context)."""

    def attempt_ended(self, inv: Invocation, attempt: Attempt, error: BaseException | None) -> None:
        """Called as soon as the body returned or raised ``error``."""

    def noted(self, inv: Invocation, kind: str, name: str, detail: dict[str, Any]) -> None:
        """A sleep or wait was reached (``kind`` "sleep" or "wait")."""


class Observers:
    """The observers registered on an engine."""

    def __init__(self) -> None:
        self.observers: list[Observer] = []

    def add(self, observer: Observer) -> Observer:
        if observer not in self.observers:
            self.observers.append(observer)
        return observer

    def remove(self, observer: Observer) -> None:
        if observer in self.observers:
            self.observers.remove(observer)

    def bind(self, claimed: ClaimedRun) -> Observed:
        return Observed(tuple(self.observers), claimed)


def _failed(observer: Observer, hook: str) -> None:
    logger.exception("observer %r failed in %s (ignored)", observer, hook)


class Observed:
    """The observers' view of one execution (what the engine calls)."""

    __slots__ = ("inv", "observers")

    def __init__(self, observers: tuple[Observer, ...], claimed: ClaimedRun) -> None:
        self.observers = observers
        self.inv = Invocation(claimed.run_id, claimed.workflow, claimed)

    async def invocation(self, run: Callable[[], Awaitable[SegmentResult]]) -> SegmentResult:
        """Run the segment inside the run scope, telling each observer."""
        token = SCOPE.set(Scope(self.inv))
        self.inv.trace = INCOMING_TRACE.get()
        try:
            if not self.observers:
                return await run()
            for o in self.observers:
                try:
                    await o.invocation_started(self.inv)
                except Exception:
                    _failed(o, "invocation_started")
            result: SegmentResult | None = None
            error: BaseException | None = None
            try:
                result = await run()
                return result
            except BaseException as exc:
                error = exc
                raise
            finally:
                for o in reversed(self.observers):
                    try:
                        await o.invocation_ended(self.inv, result, error)
                    except Exception:
                        _failed(o, "invocation_ended")
        finally:
            SCOPE.reset(token)

    def attempt_started(self, key: str, attempt: int, is_async: bool) -> Attempt:
        att = Attempt(key, attempt, is_async)
        att.token = SCOPE.set(Scope(self.inv, key, attempt))
        for o in self.observers:
            try:
                o.attempt_started(self.inv, att)
            except Exception:
                _failed(o, "attempt_started")
        return att

    def attempt_ended(self, att: Attempt, error: BaseException | None) -> None:
        for o in reversed(self.observers):
            try:
                o.attempt_ended(self.inv, att, error)
            except Exception:
                _failed(o, "attempt_ended")
        if att.token is not None:
            try:
                SCOPE.reset(att.token)
            except ValueError:  # ended in another context (should not happen): clear it
                SCOPE.set(Scope(self.inv))
            att.token = None

    def note(self, kind: str, name: str, /, **detail: Any) -> None:
        for o in self.observers:
            try:
                o.noted(self.inv, kind, name, detail)
            except Exception:
                _failed(o, "noted")


class _RunFields(logging.Filter):
    """Puts ``run_id``, ``workflow`` and ``step`` on every flowkeeper record (as ``extra``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        scope = SCOPE.get()
        if scope is not None:
            if not hasattr(record, "run_id"):
                record.run_id = scope.run_id
            if not hasattr(record, "workflow"):
                record.workflow = scope.workflow
            if not hasattr(record, "step"):
                record.step = scope.step
        return True


_FIELDS = _RunFields()


def install_run_fields() -> None:
    """Idempotent: flowkeeper's loggers carry the run scope on their records."""
    for name in ("flowkeeper", "flowkeeper.testing"):
        log = logging.getLogger(name)
        if _FIELDS not in log.filters:
            log.addFilter(_FIELDS)


install_run_fields()
