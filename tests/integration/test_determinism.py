"""Workflow code changed under a live run: detected, reported, nothing re-executed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

import asyncpg
from pydantic import BaseModel

from flowkeeper import Context, FlowKeeper
from flowkeeper.testing import FakeClock

from ..helpers import drive, make_fk, serve, wait_for

Body = Callable[[Context, Counter[str]], Awaitable[None]]


async def _run_v1_then_v2(
    database_url: str, conn: asyncpg.Connection, v1: Body, v2: Body
) -> tuple[FlowKeeper, str, Counter[str]]:
    """Run v1 until its sleep, swap in v2 (a deploy), wake the run."""
    clock = await FakeClock(conn).install()
    calls: Counter[str] = Counter()
    fk1 = make_fk(database_url)

    @fk1.workflow("w")
    async def w1(ctx: Context) -> None:
        await v1(ctx, calls)

    async with serve(fk1):
        handle = await fk1.trigger("w")
        await wait_for(lambda: _status(fk1, handle.run_id, "sleeping"))
    await fk1.aclose()

    fk2 = make_fk(database_url)

    @fk2.workflow("w")
    async def w2(ctx: Context) -> None:
        await v2(ctx, calls)

    await clock.advance(3600)
    async with serve(fk2):
        await drive(fk2, [handle.run_id])
    return fk2, handle.run_id, calls


def _step(calls: Counter[str], name: str) -> Callable[[], str]:
    def body() -> str:
        calls[name] += 1
        return name

    return body


async def test_renamed_step_is_a_determinism_error(
    database_url: str, conn: asyncpg.Connection
) -> None:
    async def v1(ctx: Context, calls: Counter[str]) -> None:
        await ctx.step("charge", _step(calls, "charge"))
        await ctx.sleep("nap", 60)
        await ctx.step("email", _step(calls, "email"))

    async def v2(ctx: Context, calls: Counter[str]) -> None:
        await ctx.step("charge-card", _step(calls, "charge-card"))  # renamed
        await ctx.sleep("nap", 60)
        await ctx.step("email", _step(calls, "email"))

    fk, run_id, calls = await _run_v1_then_v2(database_url, conn, v1, v2)
    try:
        info = await fk.get_run(run_id)
        assert info.status == "failed"
        assert info.error is not None
        assert info.error["type"] == "flowkeeper.errors.DeterminismError"
        assert info.error["step"] == "charge-card"
        assert info.error["position"] == 0
        assert "'charge'" in info.error["message"]
        assert "position 0" in info.error["message"]
        assert calls == {"charge": 1}  # nothing recorded ran again, nothing new ran
    finally:
        await fk.aclose()


async def test_moved_step_is_a_determinism_error(
    database_url: str, conn: asyncpg.Connection
) -> None:
    async def v1(ctx: Context, calls: Counter[str]) -> None:
        await ctx.step("a", _step(calls, "a"))
        await ctx.step("b", _step(calls, "b"))
        await ctx.sleep("nap", 60)

    async def v2(ctx: Context, calls: Counter[str]) -> None:
        await ctx.step("b", _step(calls, "b"))
        await ctx.step("a", _step(calls, "a"))
        await ctx.sleep("nap", 60)

    fk, run_id, calls = await _run_v1_then_v2(database_url, conn, v1, v2)
    try:
        info = await fk.get_run(run_id)
        assert info.status == "failed"
        assert info.error is not None
        assert info.error["position"] == 0
        assert calls == {"a": 1, "b": 1}
    finally:
        await fk.aclose()


async def test_removed_step_is_a_determinism_error(
    database_url: str, conn: asyncpg.Connection
) -> None:
    async def v1(ctx: Context, calls: Counter[str]) -> None:
        await ctx.step("a", _step(calls, "a"))
        await ctx.step("b", _step(calls, "b"))
        await ctx.sleep("nap", 60)

    async def v2(ctx: Context, calls: Counter[str]) -> None:
        await ctx.step("a", _step(calls, "a"))
        await ctx.sleep("nap", 60)

    fk, run_id, calls = await _run_v1_then_v2(database_url, conn, v1, v2)
    try:
        info = await fk.get_run(run_id)
        assert info.status == "failed"
        assert info.error is not None
        assert info.error["type"] == "flowkeeper.errors.DeterminismError"
        assert info.error["position"] == 1
        assert calls == {"a": 1, "b": 1}
    finally:
        await fk.aclose()


async def test_determinism_error_cannot_be_swallowed(
    database_url: str, conn: asyncpg.Connection
) -> None:
    async def v1(ctx: Context, calls: Counter[str]) -> None:
        await ctx.step("a", _step(calls, "a"))
        await ctx.sleep("nap", 60)

    async def v2(ctx: Context, calls: Counter[str]) -> None:
        try:
            await ctx.step("z", _step(calls, "z"))
        except Exception:
            pass  # user code that catches everything
        await ctx.step("after", _step(calls, "after"))

    fk, run_id, calls = await _run_v1_then_v2(database_url, conn, v1, v2)
    try:
        assert (await fk.get_run(run_id)).status == "failed"
        assert calls == {"a": 1}
    finally:
        await fk.aclose()


async def test_new_steps_after_the_history_simply_run(
    database_url: str, conn: asyncpg.Connection
) -> None:
    async def v1(ctx: Context, calls: Counter[str]) -> None:
        await ctx.step("a", _step(calls, "a"))
        await ctx.sleep("nap", 60)

    async def v2(ctx: Context, calls: Counter[str]) -> None:
        await ctx.step("a", _step(calls, "a"))
        await ctx.sleep("nap", 60)
        await ctx.step("new", _step(calls, "new"))

    fk, run_id, calls = await _run_v1_then_v2(database_url, conn, v1, v2)
    try:
        info = await fk.get_run(run_id)
        assert info.status == "completed"
        assert calls == {"a": 1, "new": 1}
        assert [s.key for s in info.steps] == ["a", "nap", "new"]
    finally:
        await fk.aclose()


async def test_a_name_repeated_in_concurrent_branches_is_refused_clearly(fk: FlowKeeper) -> None:
    import asyncio

    bodies: list[str] = []

    async def body(tag: str) -> None:
        bodies.append(tag)

    async def branch(ctx: Context, tag: str) -> None:
        await ctx.step(f"first:{tag}", body, tag)
        await ctx.step("shared", body, tag)  # occurrence numbers would depend on timing

    @fk.workflow("par")
    async def par(ctx: Context) -> None:
        await asyncio.gather(branch(ctx, "x"), branch(ctx, "y"))

    async with serve(fk):
        handle = await fk.trigger("par")
        await drive(fk, [handle.run_id])
    info = await fk.get_run(handle.run_id)
    assert info.status == "failed"
    assert info.error is not None
    assert info.error["type"] == "flowkeeper.errors.StepUsageError"
    assert "two concurrent branches" in info.error["message"]


async def _status(fk: FlowKeeper, run_id: str, status: str) -> bool:
    return (await fk.get_run(run_id)).status == status


class OrderV1(BaseModel):
    id: str


class OrderV2(BaseModel):
    id: str
    currency: str  # a new required field: old inputs no longer validate


async def test_changed_input_annotation_fails_the_live_run_clearly(
    database_url: str, conn: asyncpg.Connection
) -> None:
    clock = await FakeClock(conn).install()
    calls: Counter[str] = Counter()
    fk1 = make_fk(database_url)

    @fk1.workflow("w")
    async def w1(ctx: Context, order: OrderV1) -> None:
        await ctx.step("a", _step(calls, "a"))
        await ctx.sleep("nap", 60)

    async with serve(fk1):
        handle = await fk1.trigger("w", {"id": "o1"})
        await wait_for(lambda: _status(fk1, handle.run_id, "sleeping"))
    await fk1.aclose()
    fk2 = make_fk(database_url)

    @fk2.workflow("w")
    async def w2(ctx: Context, order: OrderV2) -> None:
        await ctx.step("a", _step(calls, "a"))
        await ctx.sleep("nap", 60)

    try:
        other = await fk2.trigger("w", {"id": "o2", "currency": "EUR"})
        await clock.advance(3600)
        async with serve(fk2):
            await drive(fk2, [handle.run_id])
            await wait_for(lambda: _status(fk2, other.run_id, "sleeping"))
        info = await fk2.get_run(handle.run_id)
        assert info.status == "failed"
        assert info.error is not None
        assert "no longer matches the input annotation" in info.error["message"]
        assert "currency" in info.error["message"]
        # A run started under the new code goes on as usual.
        assert [s.status for s in (await fk2.get_run(other.run_id)).steps] == [
            "completed",
            "sleeping",
        ]
        assert calls == {"a": 2}  # once per run: nothing re-executed
    finally:
        await fk2.aclose()
