"""Events and waits end to end: real PostgreSQL, the endpoint under a real uvicorn.

A run waits for an event durably (no invocation held), an event sent before
the wait began is not lost, matching goes through an index, sends inside a
caller's transaction exist only if it commits, event-triggered runs are
deduplicated, cancel_on stops runs, and every bad input is refused clearly.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from flowkeeper import CancelOn, Context, FlowKeeper, InvalidEventError
from flowkeeper.testing import FakeClock

from ..helpers import KEY, drive, make_fk, serve, shape, wait_for


class Paid(BaseModel):
    order_id: str
    amount: int


async def status(fk: FlowKeeper, run_id: str) -> str:
    return (await fk.get_run(run_id)).status.value


async def test_wait_then_send_wakes_the_run_with_the_event(fk: FlowKeeper) -> None:
    @fk.workflow("pay")
    async def pay(ctx: Context, order_id: str) -> dict[str, Any]:
        event = await ctx.wait_for_event(
            "paid", event="invoice.paid", match={"order_id": order_id}, model=Paid
        )
        assert isinstance(event, Paid)
        return {"amount": event.amount}

    async with serve(fk):
        handle = await fk.trigger("pay", "o-1")
        await wait_for(lambda: _is(fk, handle.run_id, "waiting"))
        info = await fk.get_run(handle.run_id)
        assert info.due_at is None  # no timeout: nothing to poll, no invocation held
        other = await fk.send_event("invoice.paid", {"order_id": "o-2", "amount": 1})
        assert other.woken == []
        sent = await fk.send_event("invoice.paid", {"order_id": "o-1", "amount": 250})
        assert sent.woken == [handle.run_id]
        assert await fk.result(handle.run_id, timeout=10) == {"amount": 250}
    wait = {s.key: s for s in (await fk.get_run(handle.run_id)).steps}["paid"]
    assert wait.kind == "wait" and wait.status == "completed"
    assert wait.output == {"order_id": "o-1", "amount": 250}


async def test_an_event_sent_before_the_wait_is_not_lost(fk: FlowKeeper) -> None:
    gate = asyncio.Event()

    @fk.workflow("late")
    async def late(ctx: Context, order_id: str) -> Any:
        await ctx.step("slow-start", gate.wait)
        return await ctx.wait_for_event("paid", event="invoice.paid", match={"order_id": order_id})

    async with serve(fk):
        handle = await fk.trigger("late", "o-7")
        sent = await fk.send_event("invoice.paid", {"order_id": "o-7", "amount": 3})
        assert sent.woken == []  # nobody was waiting yet
        gate.set()
        assert await fk.result(handle.run_id, timeout=10) == {"order_id": "o-7", "amount": 3}


async def test_an_event_from_before_the_run_started_does_not_count(fk: FlowKeeper) -> None:
    await fk.send_event("invoice.paid", {"order_id": "o-8"})

    @fk.workflow("fresh")
    async def fresh(ctx: Context) -> Any:
        return await ctx.wait_for_event(
            "paid", event="invoice.paid", match={"order_id": "o-8"}, timeout=0.5
        )

    async with serve(fk):
        handle = await fk.trigger("fresh")
        await wait_for(lambda: _is(fk, handle.run_id, "waiting"))
        await asyncio.sleep(0.6)
        await fk.tick()
        assert await fk.result(handle.run_id, timeout=10) is None  # timed out


async def test_timeout_returns_none_through_every_tick(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    clock = await FakeClock(conn).install()

    @fk.workflow("patient")
    async def patient(ctx: Context) -> str:
        got = await ctx.wait_for_event("w", event="never", timeout=timedelta(days=3))
        return "timed out" if got is None else "got it"

    async with serve(fk):
        handle = await fk.trigger("patient")
        await wait_for(lambda: _is(fk, handle.run_id, "waiting"))
        info = await fk.get_run(handle.run_id)
        assert info.due_at is not None
        await clock.advance(timedelta(days=3, seconds=1))
        await fk.tick()
        assert await fk.result(handle.run_id, timeout=10) == "timed out"
    late = await fk.send_event("never", {})
    assert late.woken == []  # a timed-out wait is resolved for good
    step = (await fk.get_run(handle.run_id)).steps[0]
    assert step.status == "timed_out"


async def test_many_runs_waiting_on_one_event_all_wake(fk: FlowKeeper) -> None:
    @fk.workflow("listener")
    async def listener(ctx: Context, i: int) -> int:
        await ctx.wait_for_event("go", event="launch")
        return i

    async with serve(fk):
        handles = [await fk.trigger("listener", i) for i in range(30)]
        for h in handles:
            await wait_for(lambda h=h: _is(fk, h.run_id, "waiting"))
        sent = await fk.send_event("launch")
        assert sorted(sent.woken) == sorted(h.run_id for h in handles)
        results = [await fk.result(h.run_id, timeout=20) for h in handles]
    assert results == list(range(30))


async def test_one_event_wakes_only_its_own_order_among_many(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    @fk.workflow("order")
    async def order(ctx: Context, n: int) -> Any:
        return await ctx.wait_for_event(
            "paid", event="invoice.paid", match={"order": {"id": n}, "region": "eu"}
        )

    dispatcher, fk.dispatcher = fk.dispatcher, None
    fk.events.push = None
    handles = [await fk.trigger("order", n) for n in range(300)]
    for h in handles:  # suspend each, in-process
        await fk.advance(h.run_id)
    fk.dispatcher = dispatcher
    waiting = await conn.fetchval("SELECT count(*) FROM flowkeeper.runs WHERE status = 'waiting'")
    assert waiting == 300
    sent = await fk.send_event("invoice.paid", {"region": "eu", "order": {"id": 7}, "x": 1})
    assert sent.woken == [handles[7].run_id]
    sent = await fk.send_event("invoice.paid", {"region": "us", "order": {"id": 8}})
    assert sent.woken == []


async def test_duplicate_event_ids_are_a_no_op(fk: FlowKeeper) -> None:
    first = await fk.send_event("user.signup", {"id": 1}, id="evt-1")
    second = await fk.send_event("user.signup", {"id": 2}, id="evt-1")
    assert not first.duplicate and second.duplicate and second.id == first.id
    events = await fk.list_events(name="user.signup")
    assert [e.data for e in events] == [{"id": 1}]


async def test_send_in_a_transaction_exists_only_if_it_commits(
    fk: FlowKeeper, database_url: str
) -> None:
    @fk.workflow("waits")
    async def waits(ctx: Context, n: int) -> Any:
        return await ctx.wait_for_event("w", event="tx", match={"n": n})

    async with serve(fk):
        a = await fk.trigger("waits", 1)
        b = await fk.trigger("waits", 2)
        await wait_for(lambda: _is(fk, a.run_id, "waiting"))
        await wait_for(lambda: _is(fk, b.run_id, "waiting"))
        conn = await asyncpg.connect(database_url)
        try:
            tx = conn.transaction()
            await tx.start()
            await fk.send_event("tx", {"n": 1}, connection=conn)
            await tx.rollback()
            async with conn.transaction():
                await fk.send_event("tx", {"n": 2}, connection=conn)
        finally:
            await conn.close()
        assert await fk.result(b.run_id, timeout=10) == {"n": 2}
        await asyncio.sleep(0.3)
        assert await status(fk, a.run_id) == "waiting"
    assert [e.data for e in await fk.list_events(name="tx")] == [{"n": 2}]


async def test_event_triggered_workflows_start_once_per_event(fk: FlowKeeper) -> None:
    @fk.workflow("welcome", on_event="user.signup")
    async def welcome(ctx: Context, user: dict[str, Any]) -> str:
        return f"hello {user['name']}"

    async with serve(fk):
        sent = await fk.send_event("user.signup", {"name": "ada"}, id="signup-ada")
        again = await fk.send_event("user.signup", {"name": "ada"}, id="signup-ada")
        assert len(sent.started) == 1 and again.duplicate and again.started == []
        assert await fk.result(sent.started[0], timeout=10) == "hello ada"


async def test_an_event_whose_data_a_listener_refuses_is_not_sent(fk: FlowKeeper) -> None:
    @fk.workflow("typed", on_event="typed.event")
    async def typed(ctx: Context, payload: Paid) -> None:
        return None

    with pytest.raises(Exception, match="typed"):
        await fk.send_event("typed.event", {"order_id": 1})  # amount missing
    assert await fk.list_events(name="typed.event") == []


async def test_cancel_on_stops_the_drip_when_the_user_upgrades(fk: FlowKeeper) -> None:
    @fk.workflow("drip", cancel_on=[CancelOn("user.upgraded", match={"user_id": "input.user_id"})])
    async def drip(ctx: Context, user: dict[str, Any]) -> None:
        await ctx.step("day-1", lambda: "mail 1")
        await ctx.sleep("wait", timedelta(days=1))
        await ctx.step("day-2", lambda: "mail 2")

    async with serve(fk):
        mine = await fk.trigger("drip", {"user_id": "u1"})
        other = await fk.trigger("drip", {"user_id": "u2"})
        await wait_for(lambda: _is(fk, mine.run_id, "sleeping"))
        await wait_for(lambda: _is(fk, other.run_id, "sleeping"))
        sent = await fk.send_event("user.upgraded", {"user_id": "u1"})
        assert sent.cancelled == [mine.run_id]
    assert await status(fk, mine.run_id) == "cancelled"
    assert await status(fk, other.run_id) == "sleeping"
    info = await fk.get_run(mine.run_id)
    assert info.events[-1].kind == "cancelled"
    assert info.events[-1].detail is not None and info.events[-1].detail["by"] == "event"


async def test_cancel_on_event_sent_between_trigger_and_start(fk: FlowKeeper) -> None:
    ran: list[str] = []

    @fk.workflow("drip2", cancel_on=[CancelOn("stop", match={"k": "input.k"})])
    async def drip2(ctx: Context, data: dict[str, Any]) -> None:
        await ctx.step("one", ran.append, "one")

    dispatcher, fk.dispatcher = fk.dispatcher, None
    handle = await fk.trigger("drip2", {"k": 5})
    fk.dispatcher = dispatcher
    await fk.send_event("stop", {"k": 5})
    result = await fk.advance(handle.run_id)
    assert ran == []
    assert await status(fk, handle.run_id) == "cancelled"
    del result


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"event": ""}, "non-empty"),
        ({"event": "x" * 201}, "limit"),
        ({"event": "ok", "match": {"a": [1]}}, "string, number or boolean"),
        ({"event": "ok", "match": {"a": None}}, "string, number or boolean"),
        ({"event": "ok", "match": {"": 1}}, "not a field name"),
        ({"event": "ok", "match": {"a": float("nan")}}, "finite"),
        ({"event": "ok", "match": {"nope": 1}, "model": Paid}, "not a field of"),
        ({"event": "ok", "timeout": -1}, "between 0"),
    ],
)
async def test_bad_waits_fail_the_run_with_a_clear_error(
    fk: FlowKeeper, kwargs: dict[str, Any], message: str
) -> None:
    @fk.workflow("bad")
    async def bad(ctx: Context) -> Any:
        return await ctx.wait_for_event("w", **kwargs)

    dispatcher, fk.dispatcher = fk.dispatcher, None
    handle = await fk.trigger("bad")
    await fk.advance(handle.run_id)
    fk.dispatcher = dispatcher
    info = await fk.get_run(handle.run_id)
    assert info.status.value == "failed"
    assert info.error is not None and message in info.error["message"]


@pytest.mark.parametrize(
    ("name", "data", "kwargs"),
    [
        ("", {}, {}),
        ("ok", float("nan"), {}),
        ("ok", {"s": "a\x00b"}, {}),
        ("ok", {"s": "\ud800"}, {}),
        ("ok", {}, {"id": ""}),
        ("ok", {}, {"id": "x\x00"}),
        ("ok", object(), {}),
    ],
)
async def test_bad_events_are_refused_and_store_nothing(
    fk: FlowKeeper, name: str, data: Any, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(InvalidEventError):
        await fk.send_event(name, data, **kwargs)
    assert await fk.list_events() == []


async def _is(fk: FlowKeeper, run_id: str, expected: str) -> bool:
    return await status(fk, run_id) == expected


async def test_ctx_send_event_is_sent_once_however_often_the_run_replays(
    fk: FlowKeeper,
) -> None:
    @fk.workflow("sender")
    async def sender(ctx: Context, n: int) -> Any:
        sent = await ctx.send_event("order.placed", {"n": n})
        await ctx.sleep("pause", timedelta(milliseconds=5))  # a replay after this
        await ctx.sleep("again", timedelta(milliseconds=5))
        return sent

    @fk.workflow("receiver", on_event="order.placed")
    async def receiver(ctx: Context, data: dict[str, Any]) -> int:
        return int(data["n"]) * 10

    async with serve(fk):
        handle = await fk.trigger("sender", 4)
        await drive(fk, [handle.run_id])
        sent = await fk.result(handle.run_id, timeout=10)
        await asyncio.sleep(0.2)
    assert sent["duplicate"] is False and sent["started"] == 1
    events = await fk.list_events(name="order.placed")
    assert len(events) == 1 and events[0].sent_by_run == handle.run_id
    assert events[0].event_id == f"run:{handle.run_id}:send:order.placed"


async def test_waits_in_a_loop_each_need_their_own_event(fk: FlowKeeper) -> None:
    @fk.workflow("collector")
    async def collector(ctx: Context) -> list[Any]:
        got = []
        for _ in range(3):
            got.append(await ctx.wait_for_event("tick", event="tick", match={"to": "c"}))
        return got

    async with serve(fk):
        handle = await fk.trigger("collector")
        for i in range(3):
            await wait_for(lambda: _is(fk, handle.run_id, "waiting"))
            await fk.send_event("tick", {"to": "c", "i": i})
            await asyncio.sleep(0.05)
        result = await fk.result(handle.run_id, timeout=10)
    assert result == [{"to": "c", "i": 0}, {"to": "c", "i": 1}, {"to": "c", "i": 2}]
    keys = [s.key for s in (await fk.get_run(handle.run_id)).steps]
    assert keys == ["tick", "tick#2", "tick#3"]


async def test_events_sent_early_satisfy_successive_waits_in_order(fk: FlowKeeper) -> None:
    gate = asyncio.Event()

    @fk.workflow("backlog")
    async def backlog(ctx: Context) -> list[Any]:
        await ctx.step("later", gate.wait)
        a = await ctx.wait_for_event("a", event="job", match={"q": 1})
        b = await ctx.wait_for_event("b", event="job", match={"q": 1})
        return [a, b]

    async with serve(fk):
        handle = await fk.trigger("backlog")
        await fk.send_event("job", {"q": 1, "n": "first"})
        await fk.send_event("job", {"q": 1, "n": "second"})
        gate.set()
        result = await fk.result(handle.run_id, timeout=10)
    assert result == [{"q": 1, "n": "first"}, {"q": 1, "n": "second"}]


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8),
    lambda c: (
        st.lists(c, max_size=4)
        | st.dictionaries(
            st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
            c,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=_values)
async def test_an_events_data_replays_exactly_as_first_seen(database_url: str, value: Any) -> None:
    fk = FlowKeeper(database_url, signing_key=KEY)
    seen: list[Any] = []
    try:

        @fk.workflow("echo-event")
        async def wf(ctx: Context) -> None:
            got = await ctx.wait_for_event("w", event="data", match={"tag": ctx.run_id})
            seen.append(shape(got))
            await ctx.sleep("pause", timedelta(milliseconds=2))

        handle = await fk.trigger("echo-event")
        await fk.advance(handle.run_id)  # now waiting
        await fk.send_event("data", {"tag": handle.run_id, "value": value})
        for _ in range(10):
            result = await fk.advance(handle.run_id)
            if (await fk.get_run(handle.run_id)).status.value == "completed":
                break
            await asyncio.sleep(0.01)
        del result
        assert len(seen) == 2 and seen[0] == seen[1]
        assert seen[0] == shape({"tag": handle.run_id, "value": value})
    finally:
        await fk.aclose()


async def test_concurrent_first_sends_of_a_fresh_process_do_not_exhaust_the_pool(
    database_url: str,
) -> None:
    # A fresh process checks the schema once, on its first query.  A send must
    # not do that while it holds a pooled connection in its transaction: with
    # more sends at once than the pool has connections, every connection would
    # be held by a send waiting for one more to check the schema with.
    fresh = make_fk(database_url, pool_size=2)
    try:
        sent = await asyncio.wait_for(
            asyncio.gather(*(fresh.send_event("cold.start", {"n": n}) for n in range(8))),
            timeout=20,
        )
    finally:
        await fresh.aclose()
    assert len({s.id for s in sent}) == 8


async def test_old_events_are_pruned_once_no_live_run_can_match_them(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    clock = await FakeClock(conn).install()
    await fk.send_event("old.news", {"n": 1})
    await clock.advance(timedelta(days=8))
    assert await fk.prune_events() == 1  # past the 7-day retention, no live run
    assert await fk.list_events(name="old.news") == []

    # A live run that started before an event may still wait for it (lookback).
    @fk.workflow("slow-reader")
    async def slow_reader(ctx: Context) -> Any:
        await ctx.sleep("first", timedelta(days=30))
        return await ctx.wait_for_event("w", event="kept.news")

    dispatcher, fk.dispatcher = fk.dispatcher, None
    handle = await fk.trigger("slow-reader")
    await fk.advance(handle.run_id)  # asleep for 30 days
    fk.dispatcher = dispatcher
    await clock.advance(timedelta(seconds=1))
    await fk.send_event("kept.news", {"n": 2})
    await clock.advance(timedelta(days=8))
    assert await fk.prune_events() == 0  # the sleeping run may still look back to it
    await clock.advance(timedelta(days=23))
    fk.dispatcher = None
    fk.events.push = None
    await fk.advance(handle.run_id)  # wakes, and its wait finds the 31-day-old event
    assert (await fk.get_run(handle.run_id)).output == {"n": 2}
    assert await fk.prune_events() == 1  # no live run is left that could match it


async def test_replaying_a_run_from_its_wait_waits_again_and_looks_back(fk: FlowKeeper) -> None:
    @fk.workflow("replayable")
    async def replayable(ctx: Context) -> Any:
        got = await ctx.wait_for_event("w", event="go", match={"k": 1})
        return await ctx.step("after", lambda: got)

    async with serve(fk):
        handle = await fk.trigger("replayable")
        await wait_for(lambda: _is(fk, handle.run_id, "waiting"))
        await fk.send_event("go", {"k": 1, "n": "first"})
        assert await fk.result(handle.run_id, timeout=10) == {"k": 1, "n": "first"}
        await fk.replay(handle.run_id, from_step="w")
        # The wait is registered again; the event sent since the run started satisfies it.
        assert await fk.result(handle.run_id, timeout=10) == {"k": 1, "n": "first"}
    info = await fk.get_run(handle.run_id)
    assert [s.key for s in info.steps] == ["w", "after"]


async def test_a_replayed_run_can_be_cancelled_by_its_rule_again(fk: FlowKeeper) -> None:
    @fk.workflow("drip3", cancel_on=[CancelOn("stop3", match={"u": "input.u"})])
    async def drip3(ctx: Context, data: dict[str, Any]) -> None:
        await ctx.step("one", lambda: 1)
        await ctx.sleep("long", timedelta(days=1))

    async with serve(fk):
        handle = await fk.trigger("drip3", {"u": 9})
        await wait_for(lambda: _is(fk, handle.run_id, "sleeping"))
        assert (await fk.send_event("stop3", {"u": 9})).cancelled == [handle.run_id]
        await fk.replay(handle.run_id)
        await wait_for(lambda: _is(fk, handle.run_id, "sleeping"))
        assert (await fk.send_event("stop3", {"u": 9})).cancelled == [handle.run_id]


async def test_one_event_wakes_its_own_run_among_10000_waiting(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The issue's scale: 10,000 waiting runs (one suspended for real, cloned in SQL)."""
    from bench.events import EVENT, fill_waiting, in_process

    await fill_waiting(database_url, 10_000)
    fk = in_process(database_url)
    try:
        sent = await fk.send_event(EVENT, {"n": 7777})
        assert len(sent.woken) == 1
        woken = await conn.fetchval(
            "SELECT (input::text)::int FROM flowkeeper.runs WHERE id = $1", sent.woken[0]
        )
        assert woken == 7777
        still = await conn.fetchval(
            "SELECT count(*) FROM flowkeeper.waits WHERE resolved_at IS NULL AND event_name = $1",
            EVENT,
        )
        assert still == 9_999
        # What send_event probes, as the planner runs it at this size: the index.
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT 1 FROM flowkeeper.waits WHERE event_name = $1 "
                "AND paths = '{n}' AND match_values = '[42]' AND resolved_at IS NULL",
                EVENT,
            )
        )
        assert "waits_match_idx" in plan, plan
        assert (await fk.send_event(EVENT, {"n": 10_001})).woken == []
    finally:
        await fk.aclose()


async def test_ticks_prune_old_events(fk: FlowKeeper, conn: asyncpg.Connection) -> None:
    clock = await FakeClock(conn).install()
    await fk.send_event("stale", {})
    await clock.advance(timedelta(days=8))
    await fk.tick()  # the first tick of a process prunes (then at most every 5 minutes)
    assert await fk.list_events(name="stale") == []
