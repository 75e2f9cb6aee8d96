"""Rate limits throttle starts (never drop them); the observed start rate stays within
10 % of the limit, with pushes and a scheduler loop driving at once."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from flowkeeper import ConfigurationError, Context, FlowKeeper, RateLimit
from flowkeeper.cli import main
from flowkeeper.engine import ClaimRefused
from flowkeeper.flowcontrol import FlowStatus
from flowkeeper.scheduler import SchedulerLoop
from flowkeeper.store import ClaimedRun

from ..helpers import busiest_window, make_fk, serve, wait_for


async def test_start_rate_stays_within_ten_percent(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    starts: list[float] = []
    resumed: list[float] = []

    async def mark(where: list[float]) -> None:
        where.append(time.monotonic())

    @fk.workflow("throttled", rate_limit=RateLimit(limit=10, period=timedelta(seconds=1)))
    async def throttled(ctx: Context, n: int) -> int:
        await ctx.step("start", mark, starts)
        if n % 10 == 0:
            await ctx.sleep("nap", 0.05)  # resuming is not a start: not throttled again
            await ctx.step("resume", mark, resumed)
        return n

    loop = SchedulerLoop(fk, max_idle=1.0)
    async with serve(fk):
        task = asyncio.create_task(loop.run())
        try:
            handles = await asyncio.gather(*(fk.trigger("throttled", i) for i in range(40)))

            async def done() -> bool:
                n = await conn.fetchval(
                    "SELECT count(*) FROM flowkeeper.runs WHERE status = 'completed'"
                )
                return bool(n == len(handles))

            await wait_for(done, timeout=30, interval=0.1)
        finally:
            loop.stop()
            await asyncio.wait_for(task, 15)
    assert len(starts) == 40 and len(resumed) == 4  # none dropped
    starts.sort()
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    assert 9.0 <= rate <= 11.0, rate
    # Nor any two-second window (a 10 % allowance: a start claimed on time may be
    # dispatched a little late, so single starts jitter around their reserved time).
    assert busiest_window(starts, 2.0) <= 22
    print(f"\nrate limit 10/s: observed {rate:.2f} starts/s over {len(starts)} starts")
    throttled_events = await conn.fetchval(
        "SELECT count(*) FROM flowkeeper.events WHERE kind = 'throttled'"
    )
    assert throttled_events >= 35


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 0}, "at least 1"),
        ({"limit": 5, "period": timedelta(0)}, "positive"),
        ({"limit": 5, "period": 1}, "timedelta"),
        ({"limit": 5, "key": "customer"}, "function"),
    ],
)
def test_bad_rate_limits(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RateLimit(**kwargs)  # type: ignore[arg-type]


async def test_a_coarse_driver_neither_bunches_starts_nor_stalls_a_backlog(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """60 pushed runs reserve start times up to 6 s ahead; the only driver is a
    tick every 3 s (pg_cron's minute, scaled down) and the time budget is 2 s.
    Honouring every reservation it finds passed would start each tick's runs
    together; exchanging them all for times beyond the invocations' reach would
    leave them late again at every tick.  Each run starts once, no second holds
    more than its share, and the backlog drains."""
    fk = make_fk(database_url, time_budget=2.0)
    starts: dict[int, float] = {}

    @fk.workflow("paced", rate_limit=RateLimit(limit=10, period=timedelta(seconds=1)))
    async def paced(ctx: Context, n: int) -> int:
        await ctx.step("start", lambda: starts.setdefault(n, time.monotonic()))
        return n

    try:
        async with serve(fk):
            handles = await asyncio.gather(*(fk.trigger("paced", i) for i in range(60)))
            t0 = time.monotonic()

            async def drained() -> bool:
                await fk.tick()
                n = await conn.fetchval(
                    "SELECT count(*) FROM flowkeeper.runs WHERE status = 'completed'"
                )
                return bool(n == 60)

            await wait_for(drained, timeout=60, interval=3.0)
            took = time.monotonic() - t0
        results = [await fk.result(h.run_id, timeout=5) for h in handles]
    finally:
        await fk.aclose()
    assert results == list(range(60)) and sorted(starts) == list(range(60))
    busiest = busiest_window(starts.values())
    print(f"\nrun rate limit, coarse driver: drained 60 in {took:.1f} s, busiest second {busiest}")
    assert busiest <= 12  # 10/s, plus one spacing's jitter either side


async def test_the_start_rule_on_its_edges(
    database_url: str, conn: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against the real claim: a run claimed before its reserved time takes
    nothing and stays due then; claimed late, it takes the next time however
    far (once, marked, a `throttled` event with `late`); late again, it takes
    a time only within the claim's reach, else keeps its place, due when the
    key's next time comes within reach; on time, it starts.  The run's page
    and ``flowkeeper runs show`` say which of these it is in."""
    fk = make_fk(database_url, endpoint=None)

    # One start a second: wide enough that the early claim below is early.
    @fk.workflow("edge", rate_limit=RateLimit(limit=1, period=timedelta(seconds=1)))
    async def edge(ctx: Context) -> None:
        return None

    async def tat() -> Any:
        return await conn.fetchval("SELECT max(tat) FROM flowkeeper.rate_limits")

    async def reason(run: str) -> str | None:
        said = await FlowStatus(fk.store).queued_reason(run)
        return None if said is None else said.text

    async def row(run: str) -> asyncpg.Record:
        found = await conn.fetchrow(
            "SELECT status, due_at, throttled_until, rate_exchanged, started_at, now() AS now "
            "FROM flowkeeper.runs WHERE id = $1",
            uuid.UUID(run),
        )
        assert found is not None
        return found

    try:
        first = (await fk.trigger("edge")).run_id
        run = (await fk.trigger("edge")).run_id
        assert isinstance(await fk.engine.claim(first, None), ClaimedRun)  # the key's time now
        refused = await fk.engine.claim(run, None)  # reserved one spacing later
        assert isinstance(refused, ClaimRefused) and not refused.late
        assert refused.starts_in is not None and 0.5 < refused.starts_in <= 1.0
        reserved = (await row(run))["throttled_until"]
        assert reserved is not None
        assert await reason(run) == (
            f"throttled by its rate limit until {reserved.isoformat(timespec='seconds')}"
        )
        # Early: made due now by someone else, claimed: it takes nothing.
        await conn.execute(
            "UPDATE flowkeeper.runs SET due_at = now() WHERE id = $1", uuid.UUID(run)
        )
        before = await tat()
        refused = await fk.engine.claim(run, None, reach=5.0)
        assert isinstance(refused, ClaimRefused) and refused.starts_in is not None
        state = await row(run)
        assert state["due_at"] == reserved and state["started_at"] is None
        assert await tat() == before
        # Late (its time 5 s past) with the key's queue 30 s ahead: the next time, once.
        await conn.execute(
            "UPDATE flowkeeper.runs SET throttled_until = now() - interval '5 seconds', "
            "due_at = now() WHERE id = $1",
            uuid.UUID(run),
        )
        await conn.execute("UPDATE flowkeeper.rate_limits SET tat = now() + interval '30 seconds'")
        queue = await tat()
        refused = await fk.engine.claim(run, None, reach=2.0)
        assert isinstance(refused, ClaimRefused) and refused.late
        state = await row(run)
        assert state["throttled_until"] == queue and state["rate_exchanged"] is True
        assert fk.engine.start_wait(refused, 2.0) is None  # 30 s: beyond reach
        events = await conn.fetch(
            "SELECT detail FROM flowkeeper.events WHERE run_id = $1 AND kind = 'throttled'",
            uuid.UUID(run),
        )
        assert [json.loads(e["detail"]).get("late") for e in events] == [None, True]
        # Late again, the queue still out of reach: it takes nothing, keeps its place.
        await conn.execute(
            "UPDATE flowkeeper.runs SET throttled_until = now() - interval '5 seconds', "
            "due_at = now() WHERE id = $1",
            uuid.UUID(run),
        )
        kept = (await row(run))["throttled_until"]
        queue = await tat()
        refused = await fk.engine.claim(run, None, reach=2.0)
        assert isinstance(refused, ClaimRefused)
        state = await row(run)
        assert state["throttled_until"] == kept and await tat() == queue
        assert state["due_at"] == queue - timedelta(seconds=2)
        # Its page says so: not "throttled until" the time it is looked at again.
        said = await reason(run)
        assert said is not None and "rate limit until" not in said, said
        assert f"its start time {kept.isoformat(timespec='seconds')} passed" in said, said
        assert "keeps its place" in said, said
        assert f"looked at again at {state['due_at'].isoformat(timespec='seconds')}" in said
        code = await asyncio.to_thread(main, ["runs", "show", run, "--database-url", database_url])
        assert code == 0
        shown = capsys.readouterr().out
        assert f"why       {said}" in shown, shown
        # Within reach (the queue drained): it takes the next time and starts then.
        await conn.execute("UPDATE flowkeeper.rate_limits SET tat = now() + interval '0.3 seconds'")
        await conn.execute(
            "UPDATE flowkeeper.runs SET due_at = now() WHERE id = $1", uuid.UUID(run)
        )
        refused = await fk.engine.claim(run, None, reach=2.0)
        assert isinstance(refused, ClaimRefused)
        wait = fk.engine.start_wait(refused, 2.0)
        assert wait is not None and 0.1 < wait <= 0.4
        claimed = await fk.engine.claim_when_due(refused, reach=2.0)
        assert isinstance(claimed, ClaimedRun)  # on time: it starts
        assert (await row(run))["started_at"] is not None
    finally:
        await fk.aclose()


async def test_a_high_rate_keeps_its_rate_when_dispatch_takes_longer_than_a_spacing(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    """100/s: a spacing of 10 ms, shorter than a claim and dispatch take under
    load.  A run woken a few spacings after its time must not count as late
    (its time exchanged and wasted): the observed rate stays near the limit."""
    starts: list[float] = []

    @fk.workflow("fast", rate_limit=RateLimit(limit=100, period=timedelta(seconds=1)))
    async def fast(ctx: Context, n: int) -> int:
        await ctx.step("start", lambda: starts.append(time.monotonic()))
        return n

    loop = SchedulerLoop(fk, max_idle=1.0)
    async with serve(fk):
        task = asyncio.create_task(loop.run())
        try:
            await asyncio.gather(*(fk.trigger("fast", i) for i in range(300)))

            async def done() -> bool:
                n = await conn.fetchval(
                    "SELECT count(*) FROM flowkeeper.runs WHERE status = 'completed'"
                )
                return bool(n == 300)

            await wait_for(done, timeout=60, interval=0.1)
        finally:
            loop.stop()
            await asyncio.wait_for(task, 15)
    starts.sort()
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    busiest = busiest_window(starts)
    print(f"\nrate limit 100/s: observed {rate:.1f} starts/s, busiest second {busiest}")
    assert len(starts) == 300
    late = await conn.fetchval(
        "SELECT count(*) FROM flowkeeper.events WHERE kind = 'throttled' AND detail ? 'late'"
    )
    print(f"late wakes that took a new time: {late}")
    # Counted as late only past 0.1 s: a few under load (13 of 300 seen), where
    # a one-spacing tolerance made 73 (80.8 starts/s).
    assert late <= 40, late
    # A start used up to 0.1 s after its time: 10 more in a second, and a few
    # for bodies that begin a moment after their time was checked.  The rate
    # is measured on a loaded machine too (89.5/s seen beside a CI run).
    assert rate >= 85 and busiest <= 115, (rate, busiest)


async def test_a_cancel_ends_an_invocations_wait_for_a_late_start_time(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """A late run's new start time 3 s away is waited for in the invocation;
    an operator's cancel meanwhile ends that wait within a second."""
    fk = make_fk(database_url, endpoint=None)

    @fk.workflow("edge", rate_limit=RateLimit(limit=1, period=timedelta(seconds=1)))
    async def edge(ctx: Context) -> None:
        return None

    try:
        run = (await fk.trigger("edge")).run_id
        await conn.execute(  # reserved long ago, exchanged once already; the queue 3 s ahead
            "UPDATE flowkeeper.runs SET throttled_until = now() - interval '5 seconds', "
            "rate_keys = '{wf:edge}', rate_spacing = '{1 second}', rate_exchanged = true, "
            "due_at = now() WHERE id = $1",
            uuid.UUID(run),
        )
        await conn.execute(
            "INSERT INTO flowkeeper.rate_limits VALUES ('wf:edge', now() + interval '3 seconds') "
            "ON CONFLICT (key) DO UPDATE SET tat = excluded.tat"
        )
        refused = await fk.engine.claim(run, None, reach=5.0)
        assert isinstance(refused, ClaimRefused) and refused.late
        assert refused.starts_in is not None and refused.starts_in > 2.5
        waiting = asyncio.create_task(fk.engine.claim_when_due(refused, reach=5.0))
        await asyncio.sleep(0.3)
        await fk.cancel(run, reason="operator")
        t0 = time.monotonic()
        result = await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - t0 < 1.5
        assert isinstance(result, ClaimRefused) and result.reason == "finished"
    finally:
        await fk.aclose()
