"""The Lambda adapter, driven by the events AWS sends, through the real mangum and Postgres."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from flowkeeper_aws_lambda import TICK_EVENT, advance_event, handler, infer
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from flowkeeper import ConfigurationError, Context, FlowKeeper, RetryPolicy, SignatureError
from flowkeeper.signing import sign_request
from flowkeeper.testing.postgres import free_port

from ..helpers import KEY, Served, wait_for
from . import lambda_events
from .conftest import ConnectionSampler
from .fake_lambda import FUNCTION_NAME, FakeLambda

FAST_RETRY = RetryPolicy(max_attempts=4, initial_delay=0.1, jitter=0)
HTTP_SHAPES: dict[str, Callable[..., dict[str, Any]]] = {
    "function-url": lambda_events.function_url,
    "http-api-v2": lambda_events.http_api_v2,
    "rest-api-v1-stage": lambda_events.rest_api_v1,
    "alb": lambda_events.alb,
}


class Order(BaseModel):
    id: str
    amount_cents: int


class Calls:
    """Step executions across every environment (they share this process)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def hit(self, name: str) -> int:
        with self.lock:
            self.counts[name] += 1
            return self.counts[name]


def checkout_fk(database_url: str, calls: Calls, *, endpoint: str | None = None) -> FlowKeeper:
    """What the function's module does at import: a FlowKeeper with the checkout workflow."""
    fk = FlowKeeper(database_url, signing_key=KEY, endpoint=endpoint, lease=5)

    async def charge_card(order: Order) -> dict[str, str]:
        if calls.hit(f"charge:{order.id}") == 1:
            raise ConnectionError("card network timed out")  # retried with backoff
        return {"charge": f"ch_{order.id}"}

    def send_receipt(order: Order) -> str:
        calls.hit(f"receipt:{order.id}")
        return f"receipt for {order.id}"

    async def ask_for_review(order: Order) -> str:
        calls.hit(f"review:{order.id}")
        return "asked"

    @fk.workflow("checkout", retry=FAST_RETRY)
    async def checkout(ctx: Context, order: Order) -> dict[str, str]:
        charge = await ctx.step("charge-card", charge_card, order)
        receipt = await ctx.step("send-receipt", send_receipt, order)
        await ctx.sleep("wait-for-review", timedelta(seconds=1))
        review = await ctx.step("ask-for-review", ask_for_review, order)
        return {**charge, "receipt": receipt, "review": review}

    return fk


def shop_app(fk: FlowKeeper) -> Starlette:
    """The user's own app: a trigger route, and the endpoint mounted at /api/flowkeeper."""

    async def place_order(request: Request) -> JSONResponse:
        order = Order.model_validate(await request.json())
        handle = await fk.trigger("checkout", order, idempotency_key=order.id)
        return JSONResponse({"run_id": handle.run_id}, status_code=201)

    return Starlette(
        routes=[
            Route("/orders", place_order, methods=["POST"]),
            Mount("/api/flowkeeper", app=fk.asgi()),
        ]
    )


def invocation(path: str, run_id: str, *, wait: bool = True) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(
        {"run_id": run_id, "lease": None, "wait": wait}, separators=(",", ":")
    ).encode()
    headers = {"content-type": "application/json"}
    headers.update(sign_request(KEY, method="POST", path=path, body=body))
    return body, headers


# routing -----------------------------------------------------------------------------
def test_events_are_routed_by_shape() -> None:
    for build in HTTP_SHAPES.values():
        assert infer(build("GET", "/api/flowkeeper/", {}, b"")) == "http"
    assert infer(lambda_events.eventbridge_scheduled()) == "tick"
    assert infer(lambda_events.scheduler_input()) == "tick"
    assert infer(TICK_EVENT) == "tick"
    assert infer({"flowkeeper": {"action": "advance", "body": "{}", "signature": "x"}}) == (
        "advance"
    )
    with pytest.raises(ConfigurationError, match="Scheduler target"):
        infer({"Records": [{"eventSource": "aws:sqs"}]})
    with pytest.raises(ConfigurationError, match="Unknown flowkeeper action 'explode'"):
        infer({"flowkeeper": {"action": "explode"}})


# HTTP events through mangum ---------------------------------------------------------------
@pytest.mark.parametrize("shape", list(HTTP_SHAPES))
async def test_http_event_shapes_reach_the_endpoint(database_url: str, shape: str) -> None:
    calls = Calls()
    # A REST API stage is part of the public URL (and so of the signed path) but
    # not of the path the function sees.
    prefix = "/prod" if shape == "rest-api-v1-stage" else ""
    endpoint = f"https://fn.example{prefix}/api/flowkeeper"
    build = HTTP_SHAPES[shape]

    def make() -> Any:
        return handler(checkout_fk(database_url, calls, endpoint=endpoint))

    async with FakeLambda(make) as fake, checkout_fk(database_url, calls) as trigger_fk:
        health = await fake.invoke(build("GET", "/api/flowkeeper/", {}, b""))
        assert health["statusCode"] == 200
        assert json.loads(health["body"])["service"] == "flowkeeper"

        run = await trigger_fk.trigger("checkout", Order(id=f"o-{shape}", amount_cents=100))
        body, headers = invocation(f"{prefix}/api/flowkeeper/", run.run_id)
        first = await fake.invoke(build("POST", "/api/flowkeeper/", headers, body))
        assert first["statusCode"] == 200, first
        assert json.loads(first["body"])["outcome"] == "retrying"

        tampered = body.replace(b'"wait":true', b'"wait":false')
        refused = await fake.invoke(build("POST", "/api/flowkeeper/", headers, tampered))
        assert refused["statusCode"] == 401
        assert json.loads(refused["body"])["error"]["code"] == "invalid_signature"

    info = await trigger_fk.get_run(run.run_id)
    assert info.status == "retrying"
    assert [e.kind for e in info.events].count("attempt_failed") == 1


# end to end -----------------------------------------------------------------------------
@pytest.mark.parametrize("dispatch", ["self-invoke", "function-url"])
async def test_checkout_with_retry_and_sleep_completes_on_lambda(
    database_url: str, dispatch: str, connections: ConnectionSampler
) -> None:
    calls = Calls()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/api/flowkeeper" if dispatch == "function-url" else None
    fake: FakeLambda

    def make() -> Any:  # one environment's init phase
        fk = checkout_fk(database_url, calls, endpoint=endpoint)
        return handler(
            fk,
            shop_app(fk),
            safety_margin=1.0,
            function_name=FUNCTION_NAME,
            lambda_client=fake.client(),
        )

    fake = FakeLambda(make)
    async with fake, Served(fake, port), FlowKeeper(database_url, signing_key=KEY) as fk:
        created = await fake.invoke(
            lambda_events.function_url(
                "POST",
                "/orders",
                {"content-type": "application/json"},
                json.dumps({"id": "o-1", "amount_cents": 4200}).encode(),
            )
        )
        assert created["statusCode"] == 201, created
        run_id = json.loads(created["body"])["run_id"]

        # The platform's schedules drive retries and sleeps: rule events and Scheduler input.
        schedules = [lambda_events.eventbridge_scheduled, lambda_events.scheduler_input]
        ticks = 0

        async def finished() -> bool:
            nonlocal ticks
            if (await fk.get_run(run_id)).status.is_finished:
                return True
            await fake.invoke(schedules[ticks % 2]())
            ticks += 1
            return False

        await wait_for(finished, timeout=30, interval=0.3)
        await fake.drain()
        info = await fk.get_run(run_id)

    assert info.status == "completed", info.error
    assert info.output == {"charge": "ch_o-1", "receipt": "receipt for o-1", "review": "asked"}
    assert calls.counts == {"charge:o-1": 2, "receipt:o-1": 1, "review:o-1": 1}
    assert not fake.errors
    if dispatch == "self-invoke":
        assert fake.async_invocations >= 1  # the trigger's push went through Invoke
    # Every environment closed its connections when its invocation ended.
    assert await connections.fresh() == 0
    assert connections.peak <= 2 * len(fake.environments)


async def test_direct_advance_uses_remaining_time_and_hands_on(database_url: str) -> None:
    executed = Calls()

    def make() -> Any:
        fk = FlowKeeper(database_url, signing_key=KEY)

        async def work(i: int) -> int:
            executed.hit(f"step-{i}")
            await asyncio.sleep(0.15)
            return i

        @fk.workflow("long")
        async def long(ctx: Context) -> int:
            return sum([await ctx.step(f"step-{i}", work, i) for i in range(6)])

        return handler(fk, safety_margin=0.0, function_name=FUNCTION_NAME, lambda_client=client)

    # 0.45 s left in the invocation: no new step starts after that.
    fake = FakeLambda(make, timeout=0.45)
    client = fake.client()
    async with fake, FlowKeeper(database_url, signing_key=KEY) as fk:
        fk.registry.add(_stub("long"))
        run = await fk.trigger("long")
        body = json.dumps({"run_id": run.run_id, "lease": None}).encode()
        event = advance_event(
            body, sign_request(KEY, method="POST", path="/api/flowkeeper/", body=body)
        )
        first = await fake.invoke(event)
        assert first["accepted"] and first["outcome"] == "handoff"
        assert 1 <= first["steps_executed"] <= 4
        # The handoff pushed a continuation through Invoke; it runs to the end.
        await wait_for(lambda: _finished(fk, run.run_id), timeout=20)
        await fake.drain()
        info = await fk.get_run(run.run_id)
    assert info.status == "completed"
    assert info.output == 15
    assert info.invocations >= 2
    assert all(n == 1 for n in executed.counts.values()) and len(executed.counts) == 6


async def test_direct_advance_refuses_a_bad_signature(database_url: str) -> None:
    def make() -> Any:
        fk = FlowKeeper(database_url, signing_key=KEY)
        fk.registry.add(_stub("noop"))
        return handler(fk, function_name=FUNCTION_NAME)

    async with FakeLambda(make) as fake, FlowKeeper(database_url, signing_key=KEY) as fk:
        fk.registry.add(_stub("noop"))
        run = await fk.trigger("noop")
        body = json.dumps({"run_id": run.run_id, "lease": None}).encode()
        wrong_key = sign_request("not-the-key", method="POST", path="/api/flowkeeper/", body=body)
        with pytest.raises(SignatureError, match="Invalid signature"):
            await fake.invoke(advance_event(body, wrong_key))
        other_path = sign_request(KEY, method="POST", path="/api/flowkeeper/tick", body=body)
        with pytest.raises(SignatureError):
            await fake.invoke(advance_event(body, other_path))
        with pytest.raises(ConfigurationError, match="signature"):
            await fake.invoke({"flowkeeper": {"action": "advance", "body": body.decode()}})
        info = await fk.get_run(run.run_id)
    assert info.status == "queued"
    assert info.invocations == 0


async def test_a_tick_invocation_uses_at_most_two_connections(
    database_url: str, connections: ConnectionSampler
) -> None:
    """20 due runs whose dispatch fails: the tick writes each failure back concurrently."""
    closed_port = free_port()

    def make() -> Any:
        fk = FlowKeeper(
            database_url,
            signing_key=KEY,
            endpoint=f"http://127.0.0.1:{closed_port}/api/flowkeeper",
            pool_size=5,
        )
        return handler(fk)

    async with FakeLambda(make) as fake, FlowKeeper(database_url, signing_key=KEY) as fk:
        fk.registry.add(_stub("noop"))
        for _ in range(20):
            await fk.trigger("noop")
        await fk.aclose()
        await asyncio.sleep(0.05)
        before = connections.peak
        result = await fake.invoke(lambda_events.eventbridge_scheduled())
        await asyncio.sleep(0.05)
    assert result == {"claimed": 20, "dispatched": 0, "failed": 20}
    assert before <= 1
    assert connections.peak <= 2
    assert await connections.fresh() == 0


# helpers ----------------------------------------------------------------------------
def _stub(name: str) -> Any:
    from flowkeeper import define_workflow

    async def fn(ctx: Context) -> None:
        return None

    return define_workflow(name, fn)


async def _finished(fk: FlowKeeper, run_id: str) -> bool:
    return (await fk.get_run(run_id)).status.is_finished


def test_handler_checks_its_configuration() -> None:
    fk = FlowKeeper("postgresql://u@127.0.0.1:1/db", signing_key=KEY)
    with pytest.raises(ConfigurationError, match="AWS_LAMBDA_FUNCTION_NAME"):
        handler(fk)
    with pytest.raises(ConfigurationError, match="max_connections"):
        handler(fk, max_connections=0, self_invoke=False)
    built = handler(fk, function_name=f"fn-{uuid.uuid4().hex[:6]}")
    assert fk.db.max_size == 2
    assert built.fk.dispatcher is not None and built.fk.dispatcher.base_path == "/api/flowkeeper"
