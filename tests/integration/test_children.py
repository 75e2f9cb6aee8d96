"""Child runs: ctx.invoke, ctx.start_child, ctx.wait_for_children (real Postgres, real uvicorn).

Children are runs of their own, pushed as their own invocations; the parent
holds no invocation while they work and is made due by the last one.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from pydantic import BaseModel

from flowkeeper import (
    ChildFailedError,
    ChildHandle,
    Context,
    FlowKeeper,
    RetryPolicy,
    UnknownWorkflowError,
)

from ..helpers import drive, make_fk, serve, wait_for

NO_RETRY = RetryPolicy(max_attempts=1)


class Score(BaseModel):
    customer: int
    points: float


@pytest.fixture
async def fk(database_url: str) -> AsyncIterator[FlowKeeper]:
    instance = make_fk(database_url, lease=2)
    try:
        yield instance
    finally:
        await instance.aclose()


def register_children(fk: FlowKeeper, calls: Counter[str]) -> None:
    @fk.workflow("score-customer", retry=NO_RETRY)
    async def score_customer(ctx: Context, customer: int) -> Score:
        async def compute() -> float:
            calls[f"score:{customer}"] += 1
            if customer < 0:
                raise ValueError(f"customer {customer} does not exist")
            return customer * 1.5

        return Score(customer=customer, points=await ctx.step("compute", compute))

    @fk.workflow("slow-child")
    async def slow_child(ctx: Context) -> str:
        await ctx.sleep("nap", 1.5)
        return "late"


async def test_invoke_returns_the_typed_output_and_links_both_ways(fk: FlowKeeper) -> None:
    calls: Counter[str] = Counter()
    register_children(fk, calls)

    @fk.workflow("parent")
    async def parent(ctx: Context, customer: int) -> dict[str, Any]:
        score = await ctx.invoke("score", "score-customer", customer)
        assert isinstance(score, Score)
        return {"points": score.points}

    async with serve(fk):
        handle = await fk.trigger("parent", 4)
        assert (await drive(fk, [handle.run_id]))[handle.run_id] == "completed"
    info = await fk.get_run(handle.run_id)
    assert info.output == {"points": 6.0}
    assert calls == {"score:4": 1}
    kids = await fk.store.run_children(handle.run_id)
    assert len(kids) == 1 and kids[0]["parent_step"] == "score"
    child_id = str(kids[0]["id"])
    assert await fk.store.run_parent(child_id) == (handle.run_id, "score")
    child = await fk.get_run(child_id)
    assert child.status == "completed" and child.output == {"customer": 4, "points": 6.0}
    # Suspended while the child worked and resumed once (or the child was done first).
    assert info.invocations <= 2
    assert [(s.key, s.kind) for s in info.steps] == [("score", "child"), ("score:wait", "children")]


async def test_a_failed_child_raises_child_failed_error_in_the_parent(fk: FlowKeeper) -> None:
    calls: Counter[str] = Counter()
    register_children(fk, calls)
    caught: list[ChildFailedError] = []

    @fk.workflow("parent")
    async def parent(ctx: Context) -> str:
        try:
            await ctx.invoke("score", "score-customer", -1)
        except ChildFailedError as exc:
            caught.append(exc)
            return f"{exc.child_status}: {exc.error_type}"
        return "no error"

    @fk.workflow("uncaught")
    async def uncaught(ctx: Context) -> None:
        await ctx.invoke("score", "score-customer", -2)

    async with serve(fk):
        a = await fk.trigger("parent")
        b = await fk.trigger("uncaught")
        await drive(fk, [a.run_id, b.run_id])
    assert (await fk.get_run(a.run_id)).output == "failed: ValueError"
    assert caught and "does not exist" in caught[-1].message
    info = await fk.get_run(b.run_id)
    assert info.status == "failed" and info.error is not None
    assert info.error["type"] == "ValueError" and "does not exist" in info.error["message"]
    assert info.error["step"] == "score:wait"


async def test_a_child_past_its_timeout_raises_in_the_parent(fk: FlowKeeper) -> None:
    register_children(fk, Counter())

    @fk.workflow("impatient")
    async def impatient(ctx: Context) -> str:
        try:
            return str(await ctx.invoke("slow", "slow-child", timeout=0.3))
        except ChildFailedError as exc:
            return type(exc).__name__

    async with serve(fk):
        handle = await fk.trigger("impatient")
        await drive(fk, [handle.run_id])
    assert (await fk.get_run(handle.run_id)).output == "ChildTimeoutError"


async def test_an_unknown_child_workflow_is_refused_at_the_call(fk: FlowKeeper) -> None:
    @fk.workflow("orphaned")
    async def orphaned(ctx: Context) -> str:
        try:
            await ctx.start_child("ghost", "not-registered", 1)
        except UnknownWorkflowError as exc:
            return str(exc)
        return "started"

    async with serve(fk):
        handle = await fk.trigger("orphaned")
        await drive(fk, [handle.run_id])
    out = (await fk.get_run(handle.run_id)).output
    assert isinstance(out, str) and "not-registered" in out
    assert await fk.store.run_children(handle.run_id) == []


async def test_fan_out_is_bounded_and_never_starts_a_child_twice(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    calls: Counter[str] = Counter()
    register_children(fk, calls)

    @fk.workflow("fan-out")
    async def fan_out(ctx: Context, n: int) -> float:
        handles: list[ChildHandle] = await asyncio.gather(
            *(ctx.start_child(f"c:{i}", "score-customer", i, max_concurrency=5) for i in range(n))
        )
        scores = await ctx.wait_for_children(handles)
        return sum(s.points for s in scores)

    async with serve(fk):
        handle = await fk.trigger("fan-out", 30)
        peak = 0

        async def done() -> bool:
            nonlocal peak
            live = await conn.fetchval(
                "SELECT count(*) FROM flowkeeper.runs WHERE parent_id = $1 "
                "AND status IN ('running', 'sleeping', 'retrying', 'waiting')",
                handle.run_id,
            )
            peak = max(peak, live)
            await fk.tick()
            return (await fk.get_run(handle.run_id)).status.is_finished

        await wait_for(done, timeout=60, interval=0.02)
    info = await fk.get_run(handle.run_id)
    assert info.status == "completed" and info.output == sum(i * 1.5 for i in range(30))
    assert calls == {f"score:{i}": 1 for i in range(30)}
    assert peak <= 5
    assert await fk.store.count_children(handle.run_id) == 30


async def test_cancelling_a_parent_cancels_its_live_children(fk: FlowKeeper) -> None:
    register_children(fk, Counter())

    @fk.workflow("keeper")
    async def keeper(ctx: Context) -> None:
        kept = await ctx.start_child("kept", "slow-child", cancel_with_parent=False)
        gone = await ctx.start_child("gone", "slow-child")
        await ctx.wait_for_children([kept, gone])

    async with serve(fk):
        handle = await fk.trigger("keeper")

        async def waiting() -> bool:
            return (await fk.get_run(handle.run_id)).status == "waiting"

        await wait_for(waiting)
        assert await fk.cancel(handle.run_id)
        kids = {r["parent_step"]: str(r["id"]) for r in await fk.store.run_children(handle.run_id)}
        assert (await fk.get_run(kids["gone"])).status == "cancelled"
        assert (await fk.get_run(kids["kept"])).status != "cancelled"
        await drive(fk, [kids["kept"]])
    assert (await fk.get_run(kids["kept"])).status == "completed"
    gone = await fk.get_run(kids["gone"])
    assert any(
        e.kind == "cancelled" and "parent" in (e.detail or {}).get("reason", "")
        for e in gone.events
    )


async def test_resuming_a_cancelled_parent_resumes_the_children_cancelled_with_it(
    fk: FlowKeeper,
) -> None:
    register_children(fk, Counter())

    @fk.workflow("resumable")
    async def resumable(ctx: Context) -> list[str]:
        kids = [await ctx.start_child(f"k{i}", "slow-child") for i in range(2)]
        return list(await ctx.wait_for_children(kids))

    async with serve(fk):
        handle = await fk.trigger("resumable")

        async def waiting() -> bool:
            return (await fk.get_run(handle.run_id)).status == "waiting"

        await wait_for(waiting)
        assert await fk.cancel(handle.run_id)
        kids = [str(r["id"]) for r in await fk.store.run_children(handle.run_id)]
        assert [(await fk.get_run(k)).status for k in kids] == ["cancelled", "cancelled"]
        await fk.replay(handle.run_id, reason="resume")
        assert (await drive(fk, [handle.run_id]))[handle.run_id] == "completed"
    assert (await fk.get_run(handle.run_id)).output == ["late", "late"]
    assert await fk.store.count_children(handle.run_id) == 2  # resumed, not started again


async def test_gathered_invokes_each_resume_when_their_child_is_done(fk: FlowKeeper) -> None:
    calls: Counter[str] = Counter()
    register_children(fk, calls)

    async def local() -> str:
        return "local"

    @fk.workflow("gathered")
    async def gathered(ctx: Context) -> list[Any]:
        slow, *scores = await asyncio.gather(
            ctx.invoke("slow", "slow-child"),
            *(ctx.invoke(f"s:{i}", "score-customer", i) for i in range(3)),
        )
        mine = await ctx.step("local", local)
        return [slow, *(s.points for s in scores), mine]

    @fk.workflow("gathered-failure")
    async def gathered_failure(ctx: Context) -> str:
        try:
            await asyncio.gather(
                ctx.invoke("ok", "score-customer", 1), ctx.invoke("bad", "score-customer", -1)
            )
        except ChildFailedError as exc:
            return f"{exc.step}: {exc.error_type}"
        return "no error"

    async with serve(fk):
        a = await fk.trigger("gathered")
        b = await fk.trigger("gathered-failure")
        assert await drive(fk, [a.run_id, b.run_id]) == {
            a.run_id: "completed",
            b.run_id: "completed",
        }
    info = await fk.get_run(a.run_id)
    assert info.output == ["late", 0.0, 1.5, 3.0, "local"]
    assert calls == {"score:0": 1, "score:1": 2, "score:2": 1, "score:-1": 1}
    assert await fk.store.count_children(a.run_id) == 4
    assert (await fk.get_run(b.run_id)).output == "bad:wait: ValueError"
