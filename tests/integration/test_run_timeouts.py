"""Run timeouts: a run not finished by its timeout, or not started by its start_timeout,
fails with RunTimeoutError naming the deadline; a late step result is discarded; the
failure alert fires."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from flowkeeper import Concurrency, ConfigurationError, Context, FlowKeeper

from ..helpers import drive, make_fk, serve


@pytest.fixture
async def quick(database_url: str) -> Any:
    fk = make_fk(database_url, lease=0.6, dispatch_lease=0.6)
    try:
        yield fk
    finally:
        await fk.aclose()


async def test_timeout_stops_a_long_step_and_discards_its_result(
    quick: FlowKeeper, conn: asyncpg.Connection
) -> None:
    alerts: list[Any] = []
    finished: list[str] = []

    async def slow() -> str:
        await asyncio.sleep(3)
        finished.append("slow")  # never reached: the step is stopped at the deadline
        return "late"

    @quick.workflow("bounded", timeout=timedelta(seconds=1), on_failure=alerts.append)
    async def bounded(ctx: Context) -> str:
        await ctx.step("quick", lambda: "ok")
        return await ctx.step("slow", slow)

    async with serve(quick):
        run_id = (await quick.trigger("bounded")).run_id
        statuses = await drive(quick, [run_id], timeout=20)
        await asyncio.sleep(2.5)  # the slow step's body would have ended by now
    assert statuses[run_id] == "failed"
    info = await quick.get_run(run_id)
    assert info.error is not None
    assert info.error["type"] == "flowkeeper.errors.RunTimeoutError"
    assert "did not finish within its timeout (deadline 20" in info.error["message"]
    assert info.error["deadline"] == "timeout"
    recorded = await conn.fetch(
        "SELECT key FROM flowkeeper.steps WHERE run_id = $1 ORDER BY position", info.id
    )
    assert [r["key"] for r in recorded] == ["quick"]  # the slow step's result is not recorded
    assert finished == []
    assert [e.kind for e in info.events if e.kind == "timed_out"] == ["timed_out"]
    assert len(alerts) == 1 and alerts[0].run_id == run_id
    took = (info.finished_at - info.created_at).total_seconds()  # type: ignore[operator]
    assert 1.0 <= took < 5.0


async def test_timeout_ends_a_long_sleep(quick: FlowKeeper) -> None:
    @quick.workflow("napper", timeout=0.8)
    async def napper(ctx: Context) -> None:
        await ctx.sleep("a-day", timedelta(days=1))

    async with serve(quick):
        run_id = (await quick.trigger("napper")).run_id
        statuses = await drive(quick, [run_id], timeout=20)
    assert statuses[run_id] == "failed"
    assert (await quick.get_run(run_id)).error["deadline"] == "timeout"  # type: ignore[index]


async def test_start_timeout_fails_a_run_left_waiting_for_a_slot(
    quick: FlowKeeper, conn: asyncpg.Connection
) -> None:
    ran: list[int] = []

    @quick.workflow(
        "single", concurrency=Concurrency(limit=1), start_timeout=timedelta(seconds=0.7)
    )
    async def single(ctx: Context, n: int) -> int:
        ran.append(n)
        await ctx.step("hold", asyncio.sleep, 2.0)
        return n

    async with serve(quick):
        first = (await quick.trigger("single", 1)).run_id
        await asyncio.sleep(0.2)
        second = (await quick.trigger("single", 2)).run_id
        statuses = await drive(quick, [first, second], timeout=30)
    assert statuses == {first: "completed", second: "failed"}
    assert ran == [1]  # the second never started
    error = (await quick.get_run(second)).error
    assert error is not None and error["deadline"] == "start_timeout"
    assert "did not start within its start_timeout" in error["message"]
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.alerts") == 1


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "1h", True, timedelta(0)])
def test_bad_timeouts_fail_at_decoration(fk: FlowKeeper, bad: Any) -> None:
    for name in ("timeout", "start_timeout"):
        with pytest.raises(ConfigurationError, match=name):

            @fk.workflow("t", **{name: bad})
            async def t(ctx: Context) -> None:
                return None

    assert "t" not in fk.registry
