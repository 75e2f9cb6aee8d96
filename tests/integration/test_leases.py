"""Leases: concurrent and duplicate invocations execute each step once; stale ones cannot write."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import timedelta

import asyncpg
import httpx

from flowkeeper import Context, FlowKeeper
from flowkeeper.engine import ClaimRefused, Outcome
from flowkeeper.signing import sign_request
from flowkeeper.store import ClaimedRun
from flowkeeper.testing import FakeClock

from ..helpers import KEY, drive, make_fk, serve, wait_for


async def test_twenty_concurrent_invocations_execute_each_step_once(fk: FlowKeeper) -> None:
    calls: Counter[str] = Counter()

    async def body(name: str) -> str:
        calls[name] += 1
        await asyncio.sleep(0.02)
        return name

    @fk.workflow("w")
    async def w(ctx: Context) -> list[str]:
        return [await ctx.step(f"s{i}", body, f"s{i}") for i in range(5)]

    # Trigger without a server: the push fails, the run is due for anyone.
    handle = await fk.trigger("w")
    payload = json.dumps({"run_id": handle.run_id, "lease": None, "wait": True}).encode()
    async with serve(fk) as server, httpx.AsyncClient() as client:

        async def invoke() -> dict[str, object]:
            headers = sign_request(KEY, method="POST", path="/api/flowkeeper/", body=payload)
            r = await client.post(
                f"{server.base_url}/api/flowkeeper/", content=payload, headers=headers
            )
            assert r.status_code == 200, r.text
            return r.json()

        answers = await asyncio.gather(*(invoke() for _ in range(20)))
        await drive(fk, [handle.run_id])
    accepted = [a for a in answers if a["accepted"]]
    assert len(accepted) == 1
    assert {a["reason"] for a in answers if not a["accepted"]} <= {"leased", "finished"}
    assert calls == {f"s{i}": 1 for i in range(5)}
    assert await fk.result(handle.run_id) == [f"s{i}" for i in range(5)]


async def test_stale_invocation_cannot_write(database_url: str, conn: asyncpg.Connection) -> None:
    """An invocation whose lease expired and was taken over is fenced off."""
    clock = await FakeClock(conn).install()
    fk = make_fk(database_url, endpoint=None, lease=30)
    gate = asyncio.Event()
    calls: Counter[str] = Counter()

    async def slow_step() -> str:
        calls["slow"] += 1
        if calls["slow"] == 1:
            await gate.wait()  # the first invocation hangs here (a frozen host)
            return "from the stale invocation"
        return "from the new invocation"

    @fk.workflow("w")
    async def w(ctx: Context) -> str:
        return await ctx.step("slow", slow_step)

    try:
        handle = await fk.trigger("w")
        first = await fk.engine.claim(handle.run_id, None)
        assert isinstance(first, ClaimedRun)
        # Heartbeats keep a live invocation's lease: stop them to model a frozen host.
        fk.engine.lease = timedelta(days=1)
        stale = asyncio.create_task(fk.execute_claimed(first))
        await wait_for(lambda: _true(calls["slow"] == 1))
        refused = await fk.engine.claim(handle.run_id, None)
        assert isinstance(refused, ClaimRefused)
        assert refused.reason == "leased"
        await clock.advance(31)  # the first lease expires
        second = await fk.engine.claim(handle.run_id, None)
        assert isinstance(second, ClaimedRun)
        result = await fk.execute_claimed(second)
        assert result.outcome is Outcome.COMPLETED
        gate.set()
        stale_result = await stale
        assert stale_result.outcome is Outcome.LEASE_LOST
        info = await fk.get_run(handle.run_id)
        assert info.status == "completed"
        assert info.output == "from the new invocation"
        assert info.steps[0].output == "from the new invocation"
    finally:
        await fk.aclose()


async def test_cancel_while_a_step_runs_discards_its_result(fk: FlowKeeper) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    after = Counter[str]()

    async def slow() -> str:
        started.set()
        await release.wait()
        return "done"

    @fk.workflow("w")
    async def w(ctx: Context) -> None:
        await ctx.step("slow", slow)
        await ctx.step("after", lambda: after.update(["after"]))

    async with serve(fk):
        handle = await fk.trigger("w")
        await asyncio.wait_for(started.wait(), 10)
        assert await fk.cancel(handle.run_id)
        release.set()
        await asyncio.sleep(0.3)
    info = await fk.get_run(handle.run_id)
    assert info.status == "cancelled"
    assert info.steps == []
    assert after["after"] == 0


async def test_lease_heartbeat_keeps_a_long_step_exclusive(database_url: str) -> None:
    fk = make_fk(database_url, lease=0.3, dispatch_lease=0.3)
    calls = Counter[str]()

    async def long_step() -> str:
        calls["long"] += 1
        await asyncio.sleep(1.2)  # four lease lengths
        return "ok"

    @fk.workflow("w")
    async def w(ctx: Context) -> str:
        return await ctx.step("long", long_step)

    try:
        async with serve(fk):
            handle = await fk.trigger("w")
            # Ticks keep running: without heartbeats they would re-dispatch the run.
            await drive(fk, [handle.run_id], interval=0.05)
        assert calls["long"] == 1
    finally:
        await fk.aclose()


async def test_tick_dispatches_a_run_whose_invocation_died(
    database_url: str, conn: asyncpg.Connection
) -> None:
    clock = await FakeClock(conn).install()
    fk = make_fk(database_url)

    @fk.workflow("w")
    async def w(ctx: Context) -> str:
        return await ctx.step("s", lambda: "ok")

    try:
        handle = await fk.trigger("w")  # push fails: nobody listens
        claimed = await fk.engine.claim(handle.run_id, None)  # an invocation that then dies
        assert isinstance(claimed, ClaimedRun)
        async with serve(fk):
            assert (await fk.tick()).claimed == 0  # its lease still holds
            await clock.advance(fk.lease.total_seconds() + 1)
            await drive(fk, [handle.run_id])
        assert await fk.result(handle.run_id) == "ok"
    finally:
        await fk.aclose()


async def _true(value: bool) -> bool:
    return value
