"""OpenTelemetry traces, with the SDK's in-memory exporter, across real invocations."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from flowkeeper import ConfigurationError, Context, FlowKeeper, RetryPolicy
from flowkeeper import tracing as tracing_module

from ..helpers import drive, make_fk, serve


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def checkout(fk: FlowKeeper, tracer: Any) -> None:
    tries = {"n": 0}

    async def reserve() -> str:
        with tracer.start_as_current_span("user: reserve stock"):  # a user's own span
            return "r1"

    def charge() -> str:  # sync: runs in flowkeeper's thread, the span context follows it
        tries["n"] += 1
        with tracer.start_as_current_span("user: call the bank"):
            if tries["n"] == 1:
                raise ConnectionError("bank timed out")
        return "c1"

    async def ship() -> str:
        return "s1"

    @fk.workflow("checkout", retry=RetryPolicy(max_attempts=3, initial_delay=0.2, jitter=0))
    async def wf(ctx: Context) -> str:
        await ctx.step("reserve", reserve)
        await ctx.step("charge", charge)
        await ctx.sleep("cool-off", 0.3)
        return await ctx.step("ship", ship)


def by_name(spans: tuple[ReadableSpan, ...], prefix: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name.startswith(prefix)), key=lambda s: s.start_time or 0)


async def test_one_trace_from_the_trigger_through_every_invocation(
    database_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    fk = make_fk(database_url, tracing=provider)
    tracer = provider.get_tracer("shop")
    checkout(fk, tracer)
    try:
        async with serve(fk):
            with tracer.start_as_current_span("POST /checkout") as request_span:
                handle = await fk.trigger("checkout")
            trace_id = request_span.get_span_context().trace_id
            assert await drive(fk, [handle.run_id]) == {handle.run_id: "completed"}
    finally:
        await fk.aclose()
    spans = exporter.get_finished_spans()
    runs = by_name(spans, "flowkeeper.run checkout")
    steps = by_name(spans, "flowkeeper.step ")
    # A retry and a sleep: three invocations (charge fails; charge again + sleep; ship).
    assert [r.attributes["flowkeeper.outcome"] for r in runs] == [  # type: ignore[index]
        "retrying",
        "sleeping",
        "completed",
    ]
    assert {s.context.trace_id for s in spans} == {trace_id}  # type: ignore[union-attr]
    request_id = request_span.get_span_context().span_id
    for run in runs:
        assert run.parent is not None and run.parent.span_id == request_id
        assert run.kind is SpanKind.CONSUMER
        assert run.attributes["flowkeeper.run_id"] == handle.run_id  # type: ignore[index]
    seen = [
        (s.attributes["flowkeeper.step"], s.attributes["flowkeeper.attempt"],  # type: ignore[index]
         s.attributes["flowkeeper.step.outcome"])  # type: ignore[index]
        for s in steps
    ]  # fmt: skip
    assert seen == [
        ("reserve", 1, "completed"),
        ("charge", 1, "error"),
        ("charge", 2, "completed"),
        ("ship", 1, "completed"),
    ]
    parents = {s.attributes["flowkeeper.step"]: s.parent.span_id for s in steps}  # type: ignore[index, union-attr]
    assert parents["reserve"] == runs[0].context.span_id  # type: ignore[union-attr]
    assert parents["ship"] == runs[2].context.span_id  # type: ignore[union-attr]
    failed = steps[1]
    assert failed.status.status_code is StatusCode.ERROR
    exc = next(e for e in failed.events if e.name == "exception")
    assert exc.attributes["exception.type"] == "ConnectionError"  # type: ignore[index]
    assert exc.attributes["exception.message"] == "bank timed out"  # type: ignore[index]
    assert failed.end_time is not None and failed.start_time is not None
    retry = next(e for e in runs[0].events if e.name == "flowkeeper.retry")
    assert retry.attributes["flowkeeper.step"] == "charge"  # type: ignore[index]
    sleep = next(e for e in runs[1].events if e.name == "flowkeeper.sleep")
    assert sleep.attributes["flowkeeper.name"] == "cool-off"  # type: ignore[index]
    assert sleep.attributes["flowkeeper.seconds"] == pytest.approx(0.3)  # type: ignore[index]
    # The user's own spans inside steps are children of the step attempt's span.
    for name, step in (("user: reserve stock", steps[0]), ("user: call the bank", steps[1])):
        user = next(s for s in spans if s.name == name)
        assert user.parent is not None and user.parent.span_id == step.context.span_id  # type: ignore[union-attr]


async def test_the_trace_is_kept_when_the_run_is_inserted_by_trigger(
    database_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # No endpoint answers: trigger inserts the run itself (and, in a transaction, the outbox).
    fk = make_fk(database_url, tracing=provider)
    tracer = provider.get_tracer("shop")
    checkout(fk, tracer)
    try:
        with tracer.start_as_current_span("cron job") as job:
            first = await fk.trigger("checkout")
            conn = await asyncpg.connect(database_url)
            try:
                async with conn.transaction():
                    second = await fk.trigger("checkout", connection=conn)
            finally:
                await conn.close()
        async with serve(fk):
            await drive(fk, [first.run_id, second.run_id])
    finally:
        await fk.aclose()
    trace_id = job.get_span_context().trace_id
    runs = by_name(exporter.get_finished_spans(), "flowkeeper.run ")
    per_run = [r.attributes["flowkeeper.run_id"] for r in runs]  # type: ignore[index]
    assert per_run.count(first.run_id) >= 2 and per_run.count(second.run_id) >= 2
    assert {r.context.trace_id for r in runs} == {trace_id}  # type: ignore[union-attr]


async def test_no_spans_and_no_rows_when_no_provider_is_configured(database_url: str) -> None:
    fk = make_fk(database_url)  # OpenTelemetry installed, but no global provider set

    @fk.workflow("plain")
    async def wf(ctx: Context) -> int:
        return await ctx.step("one", lambda: 1)

    try:
        assert fk.tracer is not None and fk.tracer._tracer() is None
        async with serve(fk):
            handle = await fk.trigger("plain")
            await drive(fk, [handle.run_id])
        conn = await asyncpg.connect(database_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM flowkeeper.run_traces") == 0
        finally:
            await conn.close()
    finally:
        await fk.aclose()


def test_without_the_extra_tracing_is_off_and_true_says_how_to_install(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracing_module, "_otel", lambda: None)
    assert make_fk(database_url).tracer is None
    with pytest.raises(ConfigurationError, match=r"pip install 'flowkeeper\[otel\]'"):
        make_fk(database_url, tracing=True)
    assert make_fk(database_url, tracing=False).tracer is None


def test_only_a_small_string_map_is_taken_as_a_carrier() -> None:
    check = tracing_module.check_carrier
    good = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    assert check(good) == good
    assert check({"traceparent": 1}) is None
    assert check(["traceparent"]) is None
    assert check({}) is None
    assert check({"tracestate": "x" * 5000}) is None
    assert json.loads(json.dumps(good)) == good


async def test_spans_are_flushed_by_aclose(database_url: str) -> None:
    flushed = asyncio.Event()

    class Provider(TracerProvider):
        def force_flush(self, timeout_millis: int = 30000) -> bool:
            flushed.set()
            return True

    fk = make_fk(database_url, tracing=Provider())
    await fk.aclose()
    assert flushed.is_set()


async def test_a_run_started_by_an_event_joins_the_senders_trace(
    database_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    fk = make_fk(database_url, tracing=provider)

    @fk.workflow("welcome", on_event="user.signup")
    async def welcome(ctx: Context, data: Any) -> int:
        return int(await ctx.step("mail", lambda: 1))

    try:
        async with serve(fk):
            with provider.get_tracer("app").start_as_current_span("POST /signup") as sender:
                sent = await fk.send_event("user.signup", {"user": 7})
            assert len(sent.started) == 1
            await drive(fk, sent.started)
    finally:
        await fk.aclose()
    runs = by_name(exporter.get_finished_spans(), "flowkeeper.run welcome")
    assert runs and all(
        r.context.trace_id == sender.get_span_context().trace_id  # type: ignore[union-attr]
        for r in runs
    )
