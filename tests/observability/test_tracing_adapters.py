"""Spans are exported before a Lambda or Vercel invocation returns (the host may freeze)."""

from __future__ import annotations

import asyncio
import json

import flowkeeper_vercel
import pytest
from flowkeeper_aws_lambda import advance_event, handler
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.types import Receive, Scope, Send

from flowkeeper import Context, FlowKeeper
from flowkeeper.signing import sign_request

from ..adapters.fake_lambda import FakeContext
from ..helpers import KEY


def batching() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider that would export only every 10 minutes unless flushed."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=600_000))
    return provider, exporter


async def one(ctx: Context) -> int:
    return int(await ctx.step("a", lambda: 1))


@pytest.mark.parametrize("keep_connections", [False, True])
async def test_lambda_advance_exports_its_spans_before_returning(
    database_url: str, keep_connections: bool
) -> None:
    provider, exporter = batching()
    fk = FlowKeeper(database_url, signing_key=KEY, tracing=provider)
    fk.workflow("one")(one)
    lam = handler(fk, safety_margin=0.0, function_name="fn", keep_connections=keep_connections)
    async with FlowKeeper(database_url, signing_key=KEY) as caller:
        caller.workflow("one")(one)
        with provider.get_tracer("app").start_as_current_span("trigger") as parent:
            run = await caller.trigger("one")  # no endpoint: inserted, trace context stored
        body = json.dumps({"run_id": run.run_id, "lease": None}).encode()
        event = advance_event(
            body, sign_request(KEY, method="POST", path="/api/flowkeeper/", body=body)
        )
        answer = await asyncio.to_thread(lam, event, FakeContext(30))
        assert answer["outcome"] == "completed"
        names = [s.name for s in exporter.get_finished_spans()]  # no wait: already exported
        assert names == ["trigger", "flowkeeper.step a", "flowkeeper.run one"]
        trace_ids = {s.context.trace_id for s in exporter.get_finished_spans()}  # type: ignore[union-attr]
        assert trace_ids == {parent.get_span_context().trace_id}
    await asyncio.to_thread(lam.close)
    provider.shutdown()


async def test_vercel_app_exports_the_requests_spans_before_answering(database_url: str) -> None:
    provider, exporter = batching()
    fk = FlowKeeper(database_url, signing_key=KEY, tracing=provider)
    tracer = provider.get_tracer("app")

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        with tracer.start_as_current_span("handled in the function"):
            pass

    app = flowkeeper_vercel.app(fk, inner, require_cron_secret=False)
    await app({"type": "http", "method": "GET", "path": "/", "headers": []}, None, None)  # type: ignore[arg-type]
    assert [s.name for s in exporter.get_finished_spans()] == ["handled in the function"]
    await fk.aclose()
    provider.shutdown()
