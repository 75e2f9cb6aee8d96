"""OpenTelemetry traces: a span per invocation, a child span per step attempt.

Install the ``otel`` extra (``pip install 'flowkeeper[otel]'``) and configure
a tracer provider as usual (the SDK and an exporter: OTLP, Honeycomb,
Datadog...).  Then every invocation of a run is a span ``flowkeeper.run
<workflow>`` with a child ``flowkeeper.step <key>`` per step attempt
(attempt, outcome, duration, the error), sleeps and waits as span events, and
the outcome of the segment (completed, sleeping, retrying with its due time...).

The trace context of the code that called ``fk.trigger()`` is kept with the
run (the signed invocation carries it, and ``run_traces`` stores it), so the
spans of every later invocation (a retry an hour later, after a sleep of a
day) join the trace of the request that started the run.

Costs nothing when OpenTelemetry is not installed (nothing is imported), and
next to nothing when no tracer provider is configured (one check per
invocation).  ``FlowKeeper(tracing=False)`` turns it off;
``tracing=<TracerProvider>`` uses that provider instead of the global one.
"""

from __future__ import annotations

import collections
import json
import logging
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import ConfigurationError, DatabaseError
from .observe import Attempt, Invocation, Observer

if TYPE_CHECKING:
    from .engine import Engine, SegmentResult
    from .store import Store

logger = logging.getLogger("flowkeeper")

_STATE = "flowkeeper.tracing"
#: The most a carried trace context may hold (traceparent + tracestate + baggage).
MAX_CARRIER = 4096


_MODULES: Any = None


def _otel() -> Any:
    """The OpenTelemetry API modules, or None when the extra is not installed."""
    global _MODULES
    if _MODULES is None:
        try:
            from opentelemetry import context, propagate, trace
        except ImportError:
            return None
        _MODULES = (context, propagate, trace)
    return _MODULES


def setup(engine: Engine, store: Store, *, enabled: object) -> Tracing | None:
    """The tracing observer for this engine (None: tracing off or OpenTelemetry absent)."""
    if enabled is False:
        return None
    if _otel() is None:
        if enabled is True:
            raise ConfigurationError(
                "tracing=True needs OpenTelemetry: pip install 'flowkeeper[otel]' (and the "
                "opentelemetry-sdk with an exporter, configured as a tracer provider)."
            )
        return None
    provider = None if enabled in (None, True) else enabled
    tracing = Tracing(store, provider)
    engine.observers.add(tracing)
    return tracing


def carrier() -> dict[str, str] | None:
    """The caller's trace context (W3C headers), or None outside any recorded span."""
    otel = _otel()
    if otel is None:
        return None
    _, propagate, trace = otel
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    out: dict[str, str] = {}
    propagate.inject(out)
    return out or None


def check_carrier(value: object) -> dict[str, str] | None:
    """A carrier from an invocation body, if it is one (anything else is ignored)."""
    if not isinstance(value, dict) or not value:
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return None
    if sum(len(k) + len(v) for k, v in value.items()) > MAX_CARRIER:
        return None
    return value


class Tracing(Observer):
    """The observer that makes the spans."""

    def __init__(self, store: Store, provider: Any = None) -> None:
        self.store = store
        self.provider = provider
        self._tracers: dict[int, Any] = {}
        # Trace contexts of runs this process invoked lately: a retry or a wake-up
        # served here again needs no read of run_traces.
        self._known: collections.OrderedDict[str, dict[str, str] | None] = collections.OrderedDict()

    def _tracer(self) -> Any:
        _, _, trace = _otel()
        provider = self.provider or trace.get_tracer_provider()
        if self.provider is None and isinstance(provider, trace.ProxyTracerProvider):
            return None  # OpenTelemetry installed but not configured: no spans, no cost
        tracer = self._tracers.get(id(provider))
        if tracer is None:
            tracer = provider.get_tracer("flowkeeper", __version__)
            self._tracers[id(provider)] = tracer
        return tracer

    async def flush(self, timeout_millis: int = 5000) -> None:
        """Export the finished spans now (before a Lambda or Vercel invocation freezes)."""
        import asyncio

        otel = _otel()
        if otel is None:
            return
        provider = self.provider or otel[2].get_tracer_provider()
        force = getattr(provider, "force_flush", None)
        if force is not None:
            await asyncio.to_thread(force, timeout_millis)

    # hooks -------------------------------------------------------------------------------
    async def invocation_started(self, inv: Invocation) -> None:
        tracer = self._tracer()
        if tracer is None:
            return
        context, propagate, trace = _otel()
        carried = inv.trace
        if carried is not None:
            try:  # the run's first invocation: keep its context for the later ones
                await self.store.run_trace_put(inv.run_id, json.dumps(carried))
            except DatabaseError as exc:
                logger.warning("run %s: trace context not stored: %s", inv.run_id, exc)
        elif inv.run_id in self._known:
            carried = self._known[inv.run_id]
        else:
            try:
                stored = await self.store.run_trace_get(inv.run_id)
            except DatabaseError:
                stored = None
            carried = check_carrier(json.loads(stored)) if stored else None
        self._known[inv.run_id] = carried
        self._known.move_to_end(inv.run_id)
        if len(self._known) > 10_000:
            self._known.popitem(last=False)
        here = trace.get_current_span()
        links = [trace.Link(here.get_span_context())] if here.get_span_context().is_valid else []
        parent = propagate.extract(carried) if carried else None
        claimed = inv.claimed
        span = tracer.start_span(
            f"flowkeeper.run {inv.workflow}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            links=links,
            attributes={
                "flowkeeper.run_id": inv.run_id,
                "flowkeeper.workflow": inv.workflow,
                "flowkeeper.invocation": claimed.invocations,
                "flowkeeper.replayed_steps": len(claimed.history),
            },
        )
        token = context.attach(trace.set_span_in_context(span))
        inv.state[_STATE] = (span, token)

    async def invocation_ended(
        self, inv: Invocation, result: SegmentResult | None, error: BaseException | None
    ) -> None:
        held = inv.state.pop(_STATE, None)
        if held is None:
            return
        context, _, trace = _otel()
        span, token = held
        try:
            if result is not None:
                span.set_attribute("flowkeeper.outcome", result.outcome.value)
                span.set_attribute("flowkeeper.steps_executed", result.steps_executed)
                if result.due_at is not None:
                    span.set_attribute("flowkeeper.due_at", result.due_at.isoformat())
                if result.outcome.value == "retrying" and result.error:
                    span.add_event(
                        "flowkeeper.retry",
                        {
                            "flowkeeper.step": str(result.error.get("step", "")),
                            "flowkeeper.due_at": result.due_at.isoformat() if result.due_at else "",
                            "exception.type": str(result.error.get("type", "")),
                        },
                    )
                if result.outcome.value == "failed":
                    message = (result.error or {}).get("message", "")
                    span.set_status(trace.Status(trace.StatusCode.ERROR, str(message)[:500]))
            if error is not None:
                span.record_exception(error)
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
        finally:
            context.detach(token)
            span.end()

    def attempt_started(self, inv: Invocation, attempt: Attempt) -> None:
        held = inv.state.get(_STATE)
        if held is None:
            return
        context, _, trace = _otel()
        tracer = self._tracer()
        span = tracer.start_span(  # the run's id and workflow are on the parent span
            f"flowkeeper.step {attempt.key}",
            attributes={
                "flowkeeper.step": attempt.key,
                "flowkeeper.attempt": attempt.attempt,
                "flowkeeper.step.async": attempt.is_async,
            },
        )
        token = context.attach(trace.set_span_in_context(span))
        attempt.state[_STATE] = (span, token)

    def attempt_ended(self, inv: Invocation, attempt: Attempt, error: BaseException | None) -> None:
        held = attempt.state.pop(_STATE, None)
        if held is None:
            return
        context, _, trace = _otel()
        span, token = held
        try:
            import asyncio

            if error is None:
                outcome = "completed"
            elif isinstance(error, asyncio.CancelledError):
                outcome = "cancelled"
            else:
                outcome = "error"
                span.record_exception(error)
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
            span.set_attribute("flowkeeper.step.outcome", outcome)
        finally:
            context.detach(token)  # (OpenTelemetry logs a detach from another context)
            span.end()

    def noted(self, inv: Invocation, kind: str, name: str, detail: dict[str, Any]) -> None:
        held = inv.state.get(_STATE)
        if held is None:
            return
        attributes = {"flowkeeper.name": name}
        for key, value in detail.items():
            if isinstance(value, str | int | float | bool):
                attributes[f"flowkeeper.{key}"] = value  # type: ignore[assignment]
        held[0].add_event(f"flowkeeper.{kind}", attributes)
