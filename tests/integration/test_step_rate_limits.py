"""Rate limits on single steps (ctx.step(..., rate_limit=...), flowkeeper.steprates).

Each attempt of a rate-limited step takes one start time of its limit, kept in
Postgres: near ones are waited for in the invocation, far ones put the run to
sleep with a ticket that the resumed run uses instead of taking another.  The
observed start rate stays within 10 % of the limit with two drivers at once;
an early wake, a hand-off and a retry take exactly what they should.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from flowkeeper import ConfigurationError, Context, FlowKeeper, RateLimit, RetryPolicy
from flowkeeper.engine import Outcome, SegmentResult
from flowkeeper.scheduler import SchedulerLoop

from ..helpers import busiest_window, drive, make_fk, serve, wait_for

PER_SECOND = RateLimit(limit=10, period=timedelta(seconds=1))


async def _completed(conn: asyncpg.Connection, n: int) -> bool:
    done = await conn.fetchval("SELECT count(*) FROM flowkeeper.runs WHERE status = 'completed'")
    return bool(done == n)


async def test_step_starts_stay_within_ten_percent_with_two_drivers(
    database_url: str, conn: asyncpg.Connection
) -> None:
    fk = make_fk(database_url, rate_limits={"api": PER_SECOND})
    starts: list[float] = []
    calls: Counter[str] = Counter()

    @fk.workflow("enrich")
    async def enrich(ctx: Context, n: int) -> int:
        await ctx.step("prepare", lambda: n)  # a plain step: not throttled

        async def call() -> int:
            starts.append(time.monotonic())
            calls[ctx.run_id] += 1
            return n * 2

        return await ctx.step("call", call, rate_limit="api")

    loop = SchedulerLoop(fk, max_idle=0.5)
    try:
        async with serve(fk):
            task = asyncio.create_task(loop.run())

            async def ticking() -> None:  # a second driver beside the loop
                while True:
                    await fk.tick()
                    await asyncio.sleep(0.2)

            ticker = asyncio.create_task(ticking())
            try:
                handles = await asyncio.gather(*(fk.trigger("enrich", i) for i in range(40)))
                await wait_for(lambda: _completed(conn, 40), timeout=40, interval=0.1)
            finally:
                ticker.cancel()
                loop.stop()
                await asyncio.wait_for(task, 15)
        results = [await fk.result(h.run_id, timeout=5) for h in handles]
    finally:
        await fk.aclose()
    assert results == [i * 2 for i in range(40)]
    assert sorted(calls.values()) == [1] * 40  # each step ran once: none dropped, none twice
    starts.sort()
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    assert 9.0 <= rate <= 11.0, rate
    # Nor any two-second window over the limit, +10 % and one call: a body starts
    # after its time by the write of the run's earlier step records that goes
    # first, which on a loaded machine can exceed one spacing (23 seen once).
    assert busiest_window(starts, 2.0) <= 23
    print(f"\nstep rate limit 10/s: observed {rate:.2f} starts/s over {len(starts)} starts")
    # The far ones slept (one throttled event each, naming the limit); every ticket was used.
    events = await conn.fetch(
        "SELECT detail->>'rate_limit' AS name FROM flowkeeper.events WHERE kind = 'throttled'"
    )
    assert len(events) >= 20 and {e["name"] for e in events} == {"api"}
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.step_tickets") == 0


async def test_an_early_wake_keeps_its_ticket_and_takes_no_second_time(
    database_url: str, conn: asyncpg.Connection
) -> None:
    fk = make_fk(database_url, rate_limits={"slow": RateLimit(1, timedelta(seconds=3))})
    started: dict[str, float] = {}

    @fk.workflow("slowly")
    async def slowly(ctx: Context) -> str:
        async def call() -> str:
            started[ctx.run_id] = time.monotonic()
            return "ok"

        return await ctx.step("call", call, rate_limit="slow")

    try:
        first = await fk.trigger("slowly")
        second = await fk.trigger("slowly")
        t0 = time.monotonic()
        await fk.advance(first.run_id)
        assert (await fk.get_run(first.run_id)).status.value == "completed"
        await fk.advance(second.run_id)  # its time is 3 s away: it sleeps with a ticket
        assert (await fk.get_run(second.run_id)).status.value == "sleeping"
        tat = await conn.fetchval("SELECT tat FROM flowkeeper.rate_limits WHERE key = 'step:slow'")
        ticket = await conn.fetchrow("SELECT attempt, slot FROM flowkeeper.step_tickets")
        assert ticket is not None and ticket["attempt"] == 1
        for _ in range(3):  # woken early, again and again (made due now, then invoked)
            await conn.execute(
                "UPDATE flowkeeper.runs SET due_at = now() WHERE id = $1", uuid.UUID(second.run_id)
            )
            result = await fk.advance(second.run_id)
            assert isinstance(result, SegmentResult) and result.outcome == Outcome.SLEEPING
            assert (await fk.get_run(second.run_id)).status.value == "sleeping"
        assert (
            await conn.fetchval("SELECT tat FROM flowkeeper.rate_limits WHERE key = 'step:slow'")
            == tat
        )  # no second time taken
        assert await conn.fetchval("SELECT slot FROM flowkeeper.step_tickets") == ticket["slot"]
        assert second.run_id not in started
        async with serve(fk):
            await drive(fk, [second.run_id], timeout=15)
        assert started[second.run_id] - t0 >= 2.8
        info = await fk.get_run(second.run_id)
        throttled = [e for e in info.events if e.kind == "throttled"]
        assert len(throttled) == 1 and throttled[0].step_key == "call"
        assert throttled[0].detail is not None and throttled[0].detail["rate_limit"] == "slow"
        assert await conn.fetchval("SELECT count(*) FROM flowkeeper.step_tickets") == 0
    finally:
        await fk.aclose()


async def test_each_attempt_takes_a_start_time_and_keeps_its_attempt_count(
    database_url: str, conn: asyncpg.Connection
) -> None:
    # 1.5 s apart: the second and third attempts each sleep on a ticket.
    fk = make_fk(database_url, rate_limits={"flaky": RateLimit(1, timedelta(seconds=1.5))})
    attempts: list[tuple[int, float]] = []

    @fk.workflow("flaky", retry=RetryPolicy(max_attempts=3, initial_delay=0.01, jitter=0.0))
    async def flaky(ctx: Context) -> int:
        async def call() -> int:
            attempts.append((ctx.step_context.attempt, time.monotonic()))
            if len(attempts) < 3:
                raise ConnectionError("provider said 503")
            return len(attempts)

        return await ctx.step("call", call, rate_limit="flaky")

    try:
        async with serve(fk):
            handle = await fk.trigger("flaky")
            statuses = await drive(fk, [handle.run_id], timeout=20)
    finally:
        await fk.aclose()
    assert statuses == {handle.run_id: "completed"}
    assert [a for a, _ in attempts] == [1, 2, 3]  # the throttled sleeps kept the count
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(attempts)]
    assert all(gap >= 1.4 for gap in gaps), gaps  # each attempt took its own start time


async def test_a_map_of_rate_limited_steps_is_spaced_and_each_item_runs_once(
    database_url: str, conn: asyncpg.Connection
) -> None:
    fk = make_fk(database_url, rate_limits={"batch": RateLimit(4, timedelta(seconds=1))})
    starts: list[tuple[int, float]] = []

    async def call(item: int) -> int:
        starts.append((item, time.monotonic()))
        return item + 100

    @fk.workflow("fan-out")
    async def fan_out(ctx: Context) -> list[int]:
        return await ctx.map("call", call, range(8), rate_limit="batch")

    try:
        async with serve(fk):
            handle = await fk.trigger("fan-out")
            await drive(fk, [handle.run_id], timeout=30)
        result = await fk.result(handle.run_id, timeout=5)
    finally:
        await fk.aclose()
    assert result == [i + 100 for i in range(8)]
    assert sorted(i for i, _ in starts) == list(range(8))  # each item once
    times = sorted(t for _, t in starts)
    # One start time per 0.25 s.  A branch woken by the driver a little late
    # starts a little late (its next neighbour then looks close): the span and
    # every one-second window are what the limit bounds.
    assert (times[-1] - times[0]) >= 7 * 0.25 * 0.9, times
    assert busiest_window(times) <= 5, times
    assert (await conn.fetchval("SELECT count(*) FROM flowkeeper.step_tickets")) == 0


async def test_a_step_naming_an_undeclared_limit_fails_its_run_clearly(
    database_url: str, conn: asyncpg.Connection
) -> None:
    hostile = 'open\'ai "ключ" step:x'  # quotes, non-ASCII, the generated key's prefix
    fk = make_fk(database_url, rate_limits={hostile: PER_SECOND})
    ran: list[str] = []

    @fk.workflow("typo")
    async def typo(ctx: Context) -> None:
        await ctx.step("call", ran.append, "x", rate_limit="open-ai")

    @fk.workflow("fine")
    async def fine(ctx: Context) -> str:
        return await ctx.step("call 'ключ'", lambda: "ok", rate_limit=hostile)

    try:
        async with serve(fk):
            bad = await fk.trigger("typo")
            good = await fk.trigger("fine")
            statuses = await drive(fk, [bad.run_id, good.run_id], timeout=15)
        info = await fk.get_run(bad.run_id)
    finally:
        await fk.aclose()
    assert statuses == {bad.run_id: "failed", good.run_id: "completed"}
    assert ran == []  # the body never ran
    assert info.error is not None
    message = str(info.error["message"])
    assert "no such rate limit" in message and "'open-ai'" in message and "ключ" in message
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM flowkeeper.rate_limits WHERE key = 'step:open-ai'"
        )
        == 0
    )
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM flowkeeper.rate_limits WHERE key = $1", f"step:{hostile}"
        )
        == 1
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["openai"], "dict of names"),
        ({"": PER_SECOND}, "name"),
        ({"a\x00b": PER_SECOND}, "name"),
        ({7: PER_SECOND}, "not a string"),
        ({"x" * 101: PER_SECOND}, "name"),
        ({"openai": 10}, "must be a RateLimit"),
        ({"openai": RateLimit(5, key=lambda v: "k")}, "no key= or scope="),
        ({"openai": RateLimit(5, scope="shared")}, "no key= or scope="),
    ],
)
def test_bad_step_rate_limits_are_refused_at_construction(value: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        FlowKeeper("postgresql://unused/db", signing_key="k" * 40, rate_limits=value)


async def test_cancelling_a_run_asleep_on_its_ticket_leaves_the_others_alone(
    database_url: str, conn: asyncpg.Connection
) -> None:
    fk = make_fk(database_url, rate_limits={"slow": RateLimit(1, timedelta(seconds=2))})
    calls: list[str] = []

    @fk.workflow("one-call")
    async def one_call(ctx: Context) -> None:
        await ctx.step("call", calls.append, ctx.run_id, rate_limit="slow")

    try:
        runs = [await fk.trigger("one-call") for _ in range(3)]
        for handle in runs:  # the first calls now; the others sleep on tickets 2 and 4 s away
            await fk.advance(handle.run_id)
        assert await conn.fetchval("SELECT count(*) FROM flowkeeper.step_tickets") == 2
        await fk.cancel(runs[1].run_id, reason="not needed")
        async with serve(fk):
            statuses = await drive(fk, [h.run_id for h in runs], timeout=20)
    finally:
        await fk.aclose()
    assert statuses == {
        runs[0].run_id: "completed",
        runs[1].run_id: "cancelled",
        runs[2].run_id: "completed",
    }
    assert calls == [runs[0].run_id, runs[2].run_id]  # the cancelled run never called
    # Its unused ticket stays with it (and goes when the run is pruned).
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.step_tickets") == 1
    await conn.execute("DELETE FROM flowkeeper.runs WHERE id = $1", uuid.UUID(runs[1].run_id))
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.step_tickets") == 0


async def test_a_cancel_ends_the_wait_for_a_near_start_time(
    database_url: str, conn: asyncpg.Connection
) -> None:
    # A heartbeat every 0.15 s notices the cancel; the wait for a time 1 s away ends then.
    fk = make_fk(
        database_url, lease=0.45, rate_limits={"paced": RateLimit(1, timedelta(seconds=1))}
    )
    calls: list[str] = []

    @fk.workflow("paced-call")
    async def paced_call(ctx: Context) -> None:
        await ctx.step("call", calls.append, ctx.run_id, rate_limit="paced")

    try:
        first = await fk.trigger("paced-call")
        second = await fk.trigger("paced-call")
        await fk.advance(first.run_id)
        t0 = time.monotonic()
        waiting = asyncio.create_task(fk.advance(second.run_id))  # waits here for its time
        await asyncio.sleep(0.15)
        assert not waiting.done()
        await fk.cancel(second.run_id, reason="no longer wanted")
        result = await asyncio.wait_for(waiting, 5)
        elapsed = time.monotonic() - t0
        status = (await fk.get_run(second.run_id)).status.value
    finally:
        await fk.aclose()
    assert isinstance(result, SegmentResult) and status == "cancelled"
    assert calls == [first.run_id]  # the waiting step never ran
    assert elapsed < 0.9, elapsed  # it stopped waiting once the cancel was seen


async def test_a_recorded_result_replays_without_taking_a_start_time(
    database_url: str, conn: asyncpg.Connection
) -> None:
    fk = make_fk(database_url, rate_limits={"once": RateLimit(1, timedelta(seconds=30))})
    calls: list[str] = []

    @fk.workflow("call-then-nap")
    async def call_then_nap(ctx: Context) -> str:
        got = await ctx.step("call", lambda: calls.append(ctx.run_id) or "ok", rate_limit="once")
        await ctx.sleep("nap", 0.05)  # the resumed run replays "call" from its record
        return got

    try:
        handle = await fk.trigger("call-then-nap")
        await fk.advance(handle.run_id)
        assert (await fk.get_run(handle.run_id)).status.value == "sleeping"
        tat = await conn.fetchval("SELECT tat FROM flowkeeper.rate_limits WHERE key = 'step:once'")
        async with serve(fk):
            await drive(fk, [handle.run_id], timeout=15)
    finally:
        await fk.aclose()
    assert calls == [handle.run_id]
    # A second take would have moved the next time 30 s on, or slept the run on a ticket.
    assert (
        await conn.fetchval("SELECT tat FROM flowkeeper.rate_limits WHERE key = 'step:once'") == tat
    )
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.step_tickets") == 0


async def test_a_coarse_driver_with_a_backlog_makes_progress_without_bunching(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """60 runs whose tickets reach 6 s ahead, driven only by a tick every 3 s
    (pg_cron's shape, scaled down) with a 2 s time budget: every ticket is late
    when its run is woken.  A late ticket exchanged for a time at the back of
    the queue, beyond the invocation's reach, is late again at the next tick:
    a backlog longer than that reach would never start.  Each run must start
    once, no second holds more than its share, and the backlog drains."""
    fk = make_fk(database_url, rate_limits={"api": PER_SECOND}, time_budget=2.0)
    starts: list[float] = []
    calls: Counter[str] = Counter()

    @fk.workflow("backlog")
    async def backlog(ctx: Context, n: int) -> int:
        async def call() -> int:
            starts.append(time.monotonic())
            calls[ctx.run_id] += 1
            return n

        return await ctx.step("call", call, rate_limit="api")

    try:
        async with serve(fk):
            handles = await asyncio.gather(*(fk.trigger("backlog", i) for i in range(60)))
            t0 = time.monotonic()

            async def drained() -> bool:
                await fk.tick()
                return await _completed(conn, 60)

            await wait_for(drained, timeout=60, interval=3.0)
            took = time.monotonic() - t0
        results = [await fk.result(h.run_id, timeout=5) for h in handles]
    finally:
        await fk.aclose()
    assert results == list(range(60))
    assert sorted(calls.values()) == [1] * 60
    starts.sort()
    busiest = busiest_window(starts)
    print(f"\ncoarse driver: drained 60 in {took:.1f} s, busiest second {busiest}")
    assert busiest <= 12  # 10/s, plus one spacing's jitter either side


async def test_a_late_ticket_goes_to_the_back_once_then_keeps_its_place(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The exchange rule on its edges, against the real statements: a late
    ticket takes the next time however far (once, marked); a late exchange
    takes one only within reach, else keeps its time and takes nothing."""
    fk = make_fk(database_url, endpoint=None, rate_limits={"api": PER_SECOND})

    @fk.workflow("w")
    async def w(ctx: Context) -> None:
        return None

    try:
        run = uuid.UUID((await fk.trigger("w")).run_id)
        rates = fk.engine.step_rates
        far = "now() + interval '30 seconds'"
        await conn.execute(f"INSERT INTO flowkeeper.rate_limits VALUES ('step:api', {far})")
        for attempt, exchanged in ((1, False), (2, True)):  # both 5 s late
            await conn.execute(
                "INSERT INTO flowkeeper.step_tickets VALUES ($1, 'call', $2, "
                "now() - interval '5 seconds', $3)",
                run,
                attempt,
                exchanged,
            )
        tat = await conn.fetchval("SELECT tat FROM flowkeeper.rate_limits WHERE key = 'step:api'")

        first = await rates.take(str(run), "call", 1, "api", 1.0, late_horizon=2.0)
        assert first.fresh and first.kept and first.slot == tat  # at the back, however far
        row = await conn.fetchrow(
            "SELECT slot, exchanged FROM flowkeeper.step_tickets WHERE attempt = 1"
        )
        assert row is not None and row["slot"] == tat and row["exchanged"]

        old = await conn.fetchval("SELECT slot FROM flowkeeper.step_tickets WHERE attempt = 2")
        tat = await conn.fetchval("SELECT tat FROM flowkeeper.rate_limits WHERE key = 'step:api'")
        second = await rates.take(str(run), "call", 2, "api", 1.0, late_horizon=2.0)
        assert not second.fresh and second.kept  # took nothing: out of reach
        assert abs((second.slot - (tat - timedelta(seconds=2))).total_seconds()) < 1e-3
        assert (
            await conn.fetchval("SELECT slot FROM flowkeeper.step_tickets WHERE attempt = 2") == old
        )
        assert (
            await conn.fetchval("SELECT tat FROM flowkeeper.rate_limits WHERE key = 'step:api'")
            == tat
        )
        # Within reach (the key's queue has drained): it takes the time and uses it now.
        await conn.execute("UPDATE flowkeeper.rate_limits SET tat = now() WHERE key = 'step:api'")
        third = await rates.take(str(run), "call", 2, "api", 1.0, late_horizon=2.0)
        assert third.fresh and not third.kept and third.wait < 0.5
        assert (
            await conn.fetchval("SELECT count(*) FROM flowkeeper.step_tickets WHERE attempt = 2")
            == 0
        )
    finally:
        await fk.aclose()


async def test_a_run_cancelled_on_its_ticket_and_replayed_calls_once_within_the_limit(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """An operator cancels a run asleep on a ticket, then replays it: before
    its time, the replayed run uses the ticket it holds (no second time); a
    second one replayed after its ticket passed takes a new time instead of
    calling at once.  Each calls once, never two within one spacing."""
    fk = make_fk(database_url, rate_limits={"slow": RateLimit(1, timedelta(seconds=2))})
    calls: dict[str, float] = {}

    @fk.workflow("one-call")
    async def one_call(ctx: Context) -> None:
        await ctx.step(
            "call", lambda: calls.setdefault(ctx.run_id, time.monotonic()), rate_limit="slow"
        )

    try:
        runs = [await fk.trigger("one-call") for _ in range(3)]
        for handle in runs:  # the first calls now; the others hold tickets 2 and 4 s away
            await fk.advance(handle.run_id)
        tickets = dict(await conn.fetch("SELECT run_id::text, slot FROM flowkeeper.step_tickets"))
        for handle in runs[1:]:
            await fk.cancel(handle.run_id, reason="operator")
        await fk.replay(runs[1].run_id)  # before its time (2 s away)
        tat = await conn.fetchval("SELECT tat FROM flowkeeper.rate_limits")
        async with serve(fk):
            await drive(fk, [runs[1].run_id], timeout=20)
            assert await conn.fetchval("SELECT tat FROM flowkeeper.rate_limits") == tat
            assert runs[2].run_id not in calls
            await asyncio.sleep(
                max(
                    0.0,
                    (tickets[runs[2].run_id] - await conn.fetchval("SELECT now()")).total_seconds(),
                )
                + 2.5
            )  # its ticket long passed
            await fk.replay(runs[2].run_id)
            statuses = await drive(fk, [h.run_id for h in runs], timeout=20)
        assert await conn.fetchval("SELECT tat FROM flowkeeper.rate_limits") > tat  # a new time
    finally:
        await fk.aclose()
    assert set(statuses.values()) == {"completed"}
    assert sorted(calls) == sorted(h.run_id for h in runs)  # each called once
    times = sorted(calls.values())
    assert all(b - a >= 1.9 for a, b in itertools.pairwise(times)), times
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.step_tickets") == 0


async def test_a_high_step_rate_keeps_its_rate_when_wakes_take_longer_than_a_spacing(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """100/s (10 ms apart): a run woken a few spacings after its ticket's time
    uses the ticket instead of exchanging it (and wasting the time it held)."""
    fk = make_fk(
        database_url, rate_limits={"api": RateLimit(limit=100, period=timedelta(seconds=1))}
    )
    starts: list[float] = []

    @fk.workflow("fast")
    async def fast(ctx: Context, n: int) -> int:
        return await ctx.step(
            "call", lambda: starts.append(time.monotonic()) or n, rate_limit="api"
        )

    loop = SchedulerLoop(fk, max_idle=1.0)
    try:
        async with serve(fk):
            task = asyncio.create_task(loop.run())
            try:
                await asyncio.gather(*(fk.trigger("fast", i) for i in range(300)))
                await wait_for(lambda: _completed(conn, 300), timeout=60, interval=0.1)
            finally:
                loop.stop()
                await asyncio.wait_for(task, 15)
    finally:
        await fk.aclose()
    starts.sort()
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    busiest = busiest_window(starts)
    print(f"\nstep rate limit 100/s: observed {rate:.1f} calls/s, busiest second {busiest}")
    assert len(starts) == 300
    # A start used up to 0.1 s after its time: 10 more in a second, and a few
    # for bodies that begin a moment after their time was checked.
    assert rate >= 90 and busiest <= 115, (rate, busiest)
