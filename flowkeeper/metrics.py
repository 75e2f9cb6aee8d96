"""Metrics: OpenTelemetry instruments, and a Prometheus text endpoint for the database gauges.

With the ``otel`` extra and a meter provider configured (global, or
``FlowKeeper(metrics=<MeterProvider>)``), the engine and the drivers record:

=================================  =========  ===================================
``flowkeeper.runs.started``        counter    {workflow}: a run's first invocation
``flowkeeper.runs.completed``      counter    {workflow}
``flowkeeper.runs.failed``         counter    {workflow}
``flowkeeper.invocations``         counter    {workflow, outcome}
``flowkeeper.run.invocations``     histogram  {workflow}: invocations a finished run took
``flowkeeper.step.attempts``       counter    {workflow, step, outcome}
``flowkeeper.step.failures``       counter    {workflow, step}
``flowkeeper.step.duration``       histogram  seconds {workflow, step}
``flowkeeper.lease.takeovers``     counter    {workflow}: a run taken from a dead invocation
``flowkeeper.dispatch.failures``   counter    {driver}: invocations a tick could not deliver
``flowkeeper.queue.depth``         gauge      runs due now (read at each tick)
``flowkeeper.queue.oldest_due_age``  gauge    seconds the oldest due run has waited
=================================  =========  ===================================

``step`` is the step's name (occurrence numbers dropped), so a loop does not
make a series per iteration.

Without an OTel collector, ``FlowKeeper(metrics_token=...)`` (or
``FLOWKEEPER_METRICS_TOKEN``) serves ``GET <endpoint>/metrics`` in the
Prometheus text format, protected by ``Authorization: Bearer <token>``: runs
by status, due and overdue runs, the oldest due run's age and each driver's
last tick, read from the database at each scrape.  Off by default.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import TYPE_CHECKING, Any

from .observe import Attempt, Invocation, Observer

if TYPE_CHECKING:
    from .engine import SegmentResult
    from .health import Health
    from .models import TickResult
    from .store import Store

logger = logging.getLogger("flowkeeper")

_ACTIVE: weakref.WeakSet[Metrics] = weakref.WeakSet()


def _api() -> Any:
    try:
        from opentelemetry import metrics
    except ImportError:
        return None
    return metrics


def setup(engine: Any, store: Store, *, enabled: object) -> Metrics | None:
    """The metrics observer (None: off, or OpenTelemetry absent)."""
    if enabled is False or _api() is None:
        return None
    provider = None if enabled in (None, True) else enabled
    m = Metrics(store, provider)
    engine.observers.add(m)
    _ACTIVE.add(m)
    return m


class _Instruments:
    def __init__(self, meter: Any, owner: Metrics) -> None:
        self.started = meter.create_counter("flowkeeper.runs.started", "{run}", "Runs started")
        self.completed = meter.create_counter(
            "flowkeeper.runs.completed", "{run}", "Runs completed"
        )
        self.failed = meter.create_counter("flowkeeper.runs.failed", "{run}", "Runs failed")
        self.invocations = meter.create_counter(
            "flowkeeper.invocations", "{invocation}", "Invocations (run segments) by outcome"
        )
        self.run_invocations = meter.create_histogram(
            "flowkeeper.run.invocations", "{invocation}", "Invocations a finished run took"
        )
        self.attempts = meter.create_counter(
            "flowkeeper.step.attempts", "{attempt}", "Step attempts by outcome"
        )
        self.failures = meter.create_counter(
            "flowkeeper.step.failures", "{attempt}", "Step attempts that raised"
        )
        self.duration = meter.create_histogram(
            "flowkeeper.step.duration", "s", "Duration of step attempts"
        )
        self.takeovers = meter.create_counter(
            "flowkeeper.lease.takeovers", "{run}", "Runs taken over from a dead invocation"
        )
        self.dispatch_failures = meter.create_counter(
            "flowkeeper.dispatch.failures", "{invocation}", "Invocations a tick could not deliver"
        )
        ref = weakref.ref(owner)

        def depth(options: Any) -> list[Any]:
            m = ref()
            return [] if m is None or m.backlog is None else [_obs(m.backlog[0])]

        def oldest(options: Any) -> list[Any]:
            m = ref()
            return [] if m is None or m.backlog is None else [_obs(m.backlog[1])]

        meter.create_observable_gauge(
            "flowkeeper.queue.depth", [depth], "{run}", "Runs due now (at the last tick)"
        )
        meter.create_observable_gauge(
            "flowkeeper.queue.oldest_due_age",
            [oldest],
            "s",
            "How long the oldest due run has waited (at the last tick)",
        )


def _obs(value: float) -> Any:
    from opentelemetry.metrics import Observation

    return Observation(value)


def _step_name(key: str) -> str:
    return key.split("#", 1)[0]


class Metrics(Observer):
    """Records the instruments from the engine's hooks and the drivers' ticks."""

    def __init__(self, store: Store, provider: Any = None) -> None:
        self.store = store
        self.provider = provider
        self._made: tuple[int, _Instruments] | None = None
        #: (due runs, oldest due age in seconds), from the last tick in this process.
        self.backlog: tuple[int, float] | None = None

    def instruments(self) -> _Instruments | None:
        api = _api()
        provider = self.provider or api.get_meter_provider()
        if self.provider is None and type(provider).__name__ == "_ProxyMeterProvider":
            return None  # installed but not configured: record nothing
        if self._made is None or self._made[0] != id(provider):
            from . import __version__

            self._made = (
                id(provider),
                _Instruments(provider.get_meter("flowkeeper", __version__), self),
            )
        return self._made[1]

    async def flush(self, timeout_millis: int = 5000) -> None:
        """Export the metrics now (before a Lambda or Vercel invocation freezes)."""
        import asyncio

        if self._made is None:
            return
        provider = self.provider or _api().get_meter_provider()
        force = getattr(provider, "force_flush", None)
        if force is not None:
            await asyncio.to_thread(force, timeout_millis)

    async def invocation_started(self, inv: Invocation) -> None:
        made = self.instruments()
        if made is None:
            return
        inv.state["flowkeeper.metrics"] = made
        labels = {"workflow": inv.workflow}
        if inv.claimed.invocations <= 1 and not inv.claimed.history:
            made.started.add(1, labels)
        if inv.claimed.lost_attempts:
            made.takeovers.add(1, labels)

    async def invocation_ended(
        self, inv: Invocation, result: SegmentResult | None, error: BaseException | None
    ) -> None:
        made: _Instruments | None = inv.state.pop("flowkeeper.metrics", None)
        if made is None:
            return
        labels = {"workflow": inv.workflow}
        outcome = result.outcome.value if result is not None else "error"
        made.invocations.add(1, {**labels, "outcome": outcome})
        if outcome == "completed":
            made.completed.add(1, labels)
        elif outcome == "failed":
            made.failed.add(1, labels)
        if outcome in ("completed", "failed"):
            made.run_invocations.record(inv.claimed.invocations, labels)

    def attempt_ended(self, inv: Invocation, attempt: Attempt, error: BaseException | None) -> None:
        made: _Instruments | None = inv.state.get("flowkeeper.metrics")
        if made is None:
            return
        import asyncio

        labels = {"workflow": inv.workflow, "step": _step_name(attempt.key)}
        if error is None:
            outcome = "completed"
        elif isinstance(error, asyncio.CancelledError):
            outcome = "cancelled"
        else:
            outcome = "error"
            made.failures.add(1, labels)
        made.attempts.add(1, {**labels, "outcome": outcome})
        made.duration.record(attempt.seconds, labels)

    async def ticked(self, kind: str, result: TickResult) -> None:
        made = self.instruments()
        if made is None:
            return
        if result.failed:
            made.dispatch_failures.add(result.failed, {"driver": kind})
        try:
            row = await self.store.backlog(0.0)
        except Exception as exc:
            logger.debug("metrics: backlog not read: %s", exc)
            return
        self.backlog = (int(row["due"]), float(row["oldest_age"] or 0.0))


async def on_tick(store: Store, kind: str, result: TickResult) -> None:
    """Called by every driver's tick (flowkeeper.health): dispatch failures, queue gauges."""
    for m in list(_ACTIVE):
        if m.store is store:
            await m.ticked(kind, result)


# Prometheus text ------------------------------------------------------------------------
def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def prometheus_text(by_status: dict[str, int], state: Health) -> str:
    """The database-derived gauges in the Prometheus text exposition format (0.0.4)."""
    lines: list[str] = []

    def gauge(name: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            lines.append(
                f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}"
            )

    statuses = ("queued", "running", "sleeping", "retrying", "waiting", "completed", "failed")
    every = sorted(set(statuses) | set(by_status) | {"cancelled"})
    gauge(
        "flowkeeper_runs",
        "Runs by status.",
        [({"status": s}, float(by_status.get(s, 0))) for s in every],
    )
    gauge("flowkeeper_due_runs", "Live runs due now.", [({}, float(state.due))])
    gauge(
        "flowkeeper_overdue_runs",
        f"Runs due for more than {state.overdue_after:.0f}s (nothing dispatched them).",
        [({}, float(state.overdue))],
    )
    gauge(
        "flowkeeper_oldest_due_seconds",
        "How long the oldest due run has waited (0 when none is due).",
        [({}, float(state.oldest_due_age or 0.0))],
    )
    gauge(
        "flowkeeper_driver_last_tick_seconds",
        "Seconds since each driver last ticked.",
        [({"kind": d.kind, "place": d.place}, d.age) for d in state.drivers],
    )
    gauge(
        "flowkeeper_healthy",
        "1 when a driver ticked recently and no run is overdue, else 0.",
        [({}, 1.0 if state.ok else 0.0)],
    )
    return "\n".join(lines) + "\n"
