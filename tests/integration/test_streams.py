"""A run's stream end to end: ctx.publish, fk.stream, and server-sent events over uvicorn."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from flowkeeper import Context, FlowKeeper, RetryPolicy, RunNotFoundError
from flowkeeper.streams import StreamMessage

from ..helpers import drive, serve


def three_steps(fk: FlowKeeper, gate: asyncio.Event | None = None) -> None:
    async def fetch(ctx_publish: Any) -> str:
        await ctx_publish("progress", {"done": 1, "of": 3})
        return "fetched"

    def score(ctx: Context) -> str:  # a sync step publishes too
        for token in ("a", "b", "c"):
            ctx.publish_nowait("draft", {"token": token})
            time.sleep(0.01)
        return "scored"

    async def store(ctx: Context) -> str:
        if gate is not None:
            await gate.wait()
        await ctx.publish("progress", {"done": 3, "of": 3})
        return "stored"

    @fk.workflow("pipeline")
    async def pipeline(ctx: Context) -> list[str]:
        await ctx.publish("status", "started")  # from the workflow function itself
        out = [await ctx.step("fetch", fetch, ctx.publish)]
        out.append(await ctx.step("score", score, ctx))
        out.append(await ctx.step("store", store, ctx))
        return out


EXPECTED = [
    ("status", "started", None),
    ("progress", {"done": 1, "of": 3}, "fetch"),
    ("draft", {"token": "a"}, "score"),
    ("draft", {"token": "b"}, "score"),
    ("draft", {"token": "c"}, "score"),
    ("progress", {"done": 3, "of": 3}, "store"),
]


def seen(messages: list[StreamMessage]) -> list[tuple[str, Any, str | None]]:
    return [(m.topic, m.data, m.step) for m in messages]


async def test_fk_stream_reads_live_from_the_first_message_to_the_end(fk: FlowKeeper) -> None:
    gate = asyncio.Event()
    three_steps(fk, gate)
    async with serve(fk):
        handle = await fk.trigger("pipeline")
        got: list[StreamMessage] = []

        async def read() -> None:
            async for message in fk.stream(handle.run_id):
                got.append(message)
                if message.topic == "draft" and message.data == {"token": "c"}:
                    gate.set()  # the run goes on only once the reader saw the live messages

        await asyncio.wait_for(read(), 20)
    assert seen(got) == EXPECTED
    assert [m.cursor for m in got] == sorted(m.cursor for m in got)
    # Read live, a step's messages are pending until its result is recorded.
    assert {m.finality for m in got} <= {"final", "pending"}
    assert (await fk.get_run(handle.run_id)).status.value == "completed"
    again = [m async for m in fk.stream(handle.run_id)]
    assert seen(again) == EXPECTED and {m.finality for m in again} == {"final"}


async def test_server_sent_events_resume_with_last_event_id(fk: FlowKeeper) -> None:
    gate = asyncio.Event()
    three_steps(fk, gate)
    async with serve(fk) as server, httpx.AsyncClient(timeout=20) as http:
        handle = await fk.trigger("pipeline")
        url = f"{server.base_url}/api/flowkeeper/runs/{handle.run_id}/stream"
        token = fk.stream_token(handle.run_id, ttl=60)
        first: list[dict[str, Any]] = []
        async with http.stream("GET", url, params={"token": token}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for event in _sse(response):
                first.append(event)
                if len(first) == 3:
                    break  # the reader goes away halfway
        gate.set()
        last_id = first[-1]["id"]
        rest: list[dict[str, Any]] = []
        async with http.stream(
            "GET", url, params={"token": token}, headers={"Last-Event-ID": last_id}
        ) as response:
            async for event in _sse(response):
                rest.append(event)
    events = [e for e in first + rest if e["event"] != "end"]
    assert [(e["event"], e["data"]["data"], e["data"]["step"]) for e in events] == EXPECTED
    assert len({e["id"] for e in events}) == len(events)  # nothing seen twice
    assert rest[-1]["event"] == "end"


async def test_poll_mode_for_hosts_that_buffer_responses(fk: FlowKeeper) -> None:
    three_steps(fk)
    async with serve(fk) as server, httpx.AsyncClient(timeout=20) as http:
        handle = await fk.trigger("pipeline")
        await fk.result(handle.run_id, timeout=20)
        url = f"{server.base_url}/api/flowkeeper/runs/{handle.run_id}/stream"
        token = fk.stream_token(handle.run_id)
        cursor, got = 0, []
        for _ in range(10):
            answer = await http.get(url, params={"token": token, "mode": "poll", "after": cursor})
            body = answer.json()
            got += body["messages"]
            cursor = body["cursor"]
            if body["finished"]:
                break
    assert [(m["topic"], m["data"], m["step"]) for m in got] == EXPECTED


async def test_stream_tokens_are_checked(fk: FlowKeeper) -> None:
    three_steps(fk)
    async with serve(fk) as server, httpx.AsyncClient(timeout=10) as http:
        handle = await fk.trigger("pipeline")
        other = await fk.trigger("pipeline")
        base = f"{server.base_url}/api/flowkeeper/runs"
        cases = {
            "none": (handle.run_id, {}),
            "forged": (handle.run_id, {"token": "x" + fk.stream_token(handle.run_id)[1:]}),
            "other run": (handle.run_id, {"token": fk.stream_token(other.run_id)}),
        }
        for name, (rid, params) in cases.items():
            answer = await http.get(f"{base}/{rid}/stream", params={**params, "mode": "poll"})
            assert answer.status_code == 401, name
            assert answer.json()["error"]["code"] == "invalid_stream_token"
        expired = fk.stream_tokens.make(handle.run_id, -1)
        answer = await http.get(f"{base}/{handle.run_id}/stream", params={"token": expired})
        assert answer.status_code == 401 and "expired" in answer.json()["error"]["message"]
        bad = await http.get(
            f"{base}/{handle.run_id}/stream",
            params={"token": fk.stream_token(handle.run_id), "after": "-1", "mode": "poll"},
        )
        assert bad.status_code == 400
        missing = "01900000-0000-7000-8000-000000000000"
        answer = await http.get(
            f"{base}/{missing}/stream", params={"token": fk.stream_token(missing), "mode": "poll"}
        )
        assert answer.status_code == 404
    with pytest.raises(RunNotFoundError):
        async for _ in fk.stream(missing):
            pass


async def test_a_retried_steps_messages_are_marked_and_final_only_hides_them(
    fk: FlowKeeper,
) -> None:
    attempts = 0

    async def flaky(ctx: Context) -> str:
        nonlocal attempts
        attempts += 1
        await ctx.publish("try", {"attempt": attempts})
        if attempts == 1:
            raise RuntimeError("first attempt fails")
        return "ok"

    @fk.workflow("flaky")
    async def wf(ctx: Context) -> str:
        return await ctx.step(
            "flaky", flaky, ctx, retry=RetryPolicy(max_attempts=2, initial_delay=0, jitter=0)
        )

    async with serve(fk):
        handle = await fk.trigger("flaky")
        await drive(fk, [handle.run_id])
    raw = [m async for m in fk.stream(handle.run_id)]
    assert [(m.data, m.attempt, m.finality) for m in raw] == [
        ({"attempt": 1}, 1, "superseded"),
        ({"attempt": 2}, 2, "final"),
    ]
    final = [m async for m in fk.stream(handle.run_id, final_only=True)]
    assert [m.data for m in final] == [{"attempt": 2}]


async def test_workflow_function_messages_are_not_repeated_on_replay(fk: FlowKeeper) -> None:
    @fk.workflow("replays")
    async def wf(ctx: Context) -> None:
        await ctx.publish("phase", "one")
        await ctx.sleep("pause", 0.01)
        await ctx.publish("phase", "two")
        await ctx.sleep("pause-again", 0.01)

    async with serve(fk):
        handle = await fk.trigger("replays")
        await drive(fk, [handle.run_id])
    assert [m.data async for m in fk.stream(handle.run_id)] == ["one", "two"]


@pytest.mark.parametrize(
    ("topic", "data", "message"),
    [
        ("", 1, "non-empty"),
        ("t" * 201, 1, "longer than"),
        ("ok", float("nan"), "NaN"),
        ("ok", object(), "cannot be stored"),
        ("ok", "x" * 70_000, "limit"),
    ],
)
async def test_bad_messages_fail_the_step_with_a_clear_error(
    fk: FlowKeeper, topic: str, data: Any, message: str
) -> None:
    async def step(ctx: Context) -> None:
        await ctx.publish(topic, data)

    @fk.workflow("bad")
    async def wf(ctx: Context) -> None:
        await ctx.step("publish", step, ctx, retry=RetryPolicy.none())

    dispatcher, fk.dispatcher = fk.dispatcher, None
    handle = await fk.trigger("bad")
    await fk.advance(handle.run_id)
    fk.dispatcher = dispatcher
    info = await fk.get_run(handle.run_id)
    assert info.status.value == "failed"
    assert info.error is not None and message in info.error["message"]
    assert [m async for m in fk.stream(handle.run_id)] == []


async def test_a_runs_stream_is_capped_with_a_marker(fk: FlowKeeper) -> None:
    fk.engine.stream_max_messages = 5

    async def chatty(ctx: Context) -> None:
        for i in range(20):
            await ctx.publish("n", i)

    @fk.workflow("chatty")
    async def wf(ctx: Context) -> None:
        await ctx.step("chatty", chatty, ctx)

    dispatcher, fk.dispatcher = fk.dispatcher, None
    handle = await fk.trigger("chatty")
    await fk.advance(handle.run_id)
    fk.dispatcher = dispatcher
    messages = [m async for m in fk.stream(handle.run_id)]
    assert len(messages) == 5
    assert messages[-1].topic == "flowkeeper.truncated"


async def _sse(response: httpx.Response) -> Any:
    """Parse server-sent events (id, event, JSON data) from a streaming response."""
    event: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if not line:
            if "data" in event:
                yield event
            event = {}
            continue
        field, _, value = line.partition(": ")
        if field == "data":
            event["data"] = json.loads(value)
        elif field in ("id", "event"):
            event[field] = value


async def test_long_polling_waits_for_the_next_message(fk: FlowKeeper) -> None:
    go_on = asyncio.Event()

    async def slow(ctx: Context) -> None:
        await go_on.wait()
        await ctx.publish("late", 1)

    @fk.workflow("slow-talker")
    async def wf(ctx: Context) -> None:
        await ctx.step("slow", slow, ctx)

    async with serve(fk) as server, httpx.AsyncClient(timeout=20) as http:
        handle = await fk.trigger("slow-talker")
        url = f"{server.base_url}/api/flowkeeper/runs/{handle.run_id}/stream"
        params = {"token": fk.stream_token(handle.run_id), "mode": "poll", "wait": "10"}
        pending = asyncio.create_task(http.get(url, params=params))
        await asyncio.sleep(0.5)
        assert not pending.done()  # held open: nothing to say yet
        go_on.set()
        answer = await asyncio.wait_for(pending, 10)
        assert [m["data"] for m in answer.json()["messages"]] == [1]
        refused = await http.get(url, params={**params, "wait": "99"})
        assert refused.status_code == 400
