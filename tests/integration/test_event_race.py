"""A wait being recorded and its event being sent at the same moment never miss each other.

No faults here, only the race itself, in-process: 200 runs, each advanced
(its first step, then its wait registered by ``register_wait``) concurrently
with the send of its own event, with a random head start for either side.
Whichever commits first, the run must see its event exactly once: found by
the wait's lookback (the event committed first) or resolved by the send (the
wait committed first).  A run that ends up waiting for an event that was sent
is the bug this guards against.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from typing import Any

import asyncpg
import pytest

from flowkeeper import Context, FlowKeeper
from flowkeeper.engine import ClaimRefused

RUNS = 200
# Enough for pairs to overlap, few enough for the test pool (5 connections each side).
CONCURRENT_PAIRS = 24


async def test_register_and_send_racing_lose_no_event(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)

    @fk.workflow("racer")
    async def racer(ctx: Context, i: int) -> Any:
        await ctx.step("first", lambda: i)
        return await ctx.wait_for_event("got", event="race", match={"i": i})

    # In-process only: no pushes, the test advances every run itself.
    fk.dispatcher = None
    fk.events.push = None
    handles = [await fk.trigger("racer", i) for i in range(RUNS)]
    ids = [h.run_id for h in handles]
    gate = asyncio.Semaphore(CONCURRENT_PAIRS)

    async def pair(i: int) -> None:
        # The send starts up to 5 ms before the advance or up to 30 ms after it:
        # the advance's claim and first step take a few ms before its wait is
        # registered, so sends land before, during and after the registration.
        # Every fourth send waits longer (up to 250 ms): on a loaded machine an
        # advance can take more than 30 ms, and those sends still come after.
        offset = rng.uniform(-0.005, 0.03) if i % 4 else rng.uniform(0.03, 0.25)

        async def advance() -> None:
            await asyncio.sleep(max(0.0, -offset))
            await fk.advance(ids[i])

        async def send() -> None:
            await asyncio.sleep(max(0.0, offset))
            await fk.send_event("race", {"i": i, "n": f"event-{i}"})

        async with gate:
            await asyncio.gather(advance(), send())

    await asyncio.gather(*(pair(i) for i in range(RUNS)))

    # The sends woke the runs whose wait they resolved (due now, nothing pushed).
    for rid in ids:
        await fk.advance(rid)
    await check_every_run_saw_its_event_once(conn, ids, seed=seed)


async def check_every_run_saw_its_event_once(
    conn: asyncpg.Connection, ids: list[str], *, seed: int
) -> None:
    rows = await conn.fetch(
        "SELECT id::text, status, (input::text)::int AS i, output::text AS output "
        "FROM flowkeeper.runs WHERE id = ANY($1::uuid[])",
        ids,
    )
    assert len(rows) == len(ids)
    stuck = [dict(r) for r in rows if r["status"] != "completed"]
    assert not stuck, f"seed {seed}: {len(stuck)} runs did not complete: {stuck[:5]}"
    wrong = [
        dict(r) for r in rows if json.loads(r["output"]) != {"i": r["i"], "n": f"event-{r['i']}"}
    ]
    assert not wrong, f"seed {seed}: runs returned another event: {wrong[:5]}"
    waits = await conn.fetch(
        "SELECT w.run_id::text, (r.input::text)::int AS i, w.outcome, w.resolved_at, w.created_at, "
        "       (e.data->>'i')::int AS event_i "
        "FROM flowkeeper.waits w JOIN flowkeeper.runs r ON r.id = w.run_id "
        "LEFT JOIN flowkeeper.event_log e ON e.id = w.resolved_event "
        "WHERE w.run_id = ANY($1::uuid[])",
        ids,
    )
    assert len(waits) == len(ids), "a run has no wait, or more than one"
    bad = [dict(w) for w in waits if w["outcome"] != "event" or w["event_i"] != w["i"]]
    assert not bad, f"seed {seed}: waits resolved wrongly: {bad[:5]}"
    # Each event resolved exactly one wait: its own run's.
    per_event = await conn.fetch(
        "SELECT e.id, count(w.run_id) AS n FROM flowkeeper.event_log e "
        "LEFT JOIN flowkeeper.waits w ON w.resolved_event = e.id WHERE e.name = 'race' "
        "GROUP BY e.id"
    )
    assert len(per_event) == len(ids)
    assert all(r["n"] == 1 for r in per_event), [dict(r) for r in per_event if r["n"] != 1][:5]
    wait_steps = await conn.fetchval(
        "SELECT count(*) FROM flowkeeper.steps WHERE kind = 'wait' AND status = 'completed' "
        "AND run_id = ANY($1::uuid[])",
        ids,
    )
    assert wait_steps == len(ids)
    # Both orders happened, or the race was not run: found by the lookback
    # (the event committed first) and resolved by the send (the wait first).
    by_lookback = sum(1 for w in waits if w["resolved_at"] == w["created_at"])
    by_send = len(waits) - by_lookback
    print(f"\nrace: {by_lookback} waits found their event by lookback, {by_send} woken by the send")
    assert by_lookback and by_send, (by_lookback, by_send)


# The two "during" orders, made deterministic by holding one side's transaction open.


async def _blocked_on_advisory_lock(conn: asyncpg.Connection) -> bool:
    n = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
    )
    return bool(n)


async def _until_blocked(conn: asyncpg.Connection, task: asyncio.Task[Any]) -> None:
    for _ in range(200):
        if await _blocked_on_advisory_lock(conn):
            assert not task.done()
            return
        assert not task.done(), "it went ahead without waiting for the other side to commit"
        await asyncio.sleep(0.01)
    raise AssertionError("never blocked on the other side's lock")


def _held_workflow(fk: FlowKeeper) -> None:
    @fk.workflow("held")
    async def held(ctx: Context, i: int) -> Any:
        return await ctx.wait_for_event("got", event="held", match={"i": i})


@pytest.mark.parametrize("shape", ["new", "known"])
async def test_a_wait_registered_while_its_send_is_uncommitted_finds_the_event(
    fk: FlowKeeper, conn: asyncpg.Connection, database_url: str, shape: str
) -> None:
    _held_workflow(fk)
    fk.dispatcher = None
    fk.events.push = None
    if shape == "known":
        await fk.advance((await fk.trigger("held", -1)).run_id)  # records the shape
    rid = (await fk.trigger("held", 1)).run_id
    sender = await asyncpg.connect(database_url)
    try:
        tx = sender.transaction()
        await tx.start()
        sent = await fk.send_event("held", {"i": 1}, connection=sender)
        assert sent.woken == []  # nobody waits yet
        advancing = asyncio.create_task(fk.advance(rid))
        await _until_blocked(conn, advancing)
        await tx.commit()
        await advancing
    finally:
        await sender.close()
    assert await fk.result(rid, timeout=5) == {"i": 1}


@pytest.mark.parametrize("shape", ["new", "known"])
async def test_an_event_sent_while_its_wait_is_uncommitted_wakes_the_run(
    fk: FlowKeeper, conn: asyncpg.Connection, database_url: str, shape: str
) -> None:
    _held_workflow(fk)
    fk.dispatcher = None
    fk.events.push = None
    if shape == "known":
        await fk.advance((await fk.trigger("held", -1)).run_id)
    rid = (await fk.trigger("held", 1)).run_id
    claimed = await fk.engine.claim(rid, None)
    assert not isinstance(claimed, ClaimRefused)
    waiter = await asyncpg.connect(database_url)
    try:
        tx = waiter.transaction()
        await tx.start()
        # What the engine's register_wait sends (flowkeeper.waits.wait), in a
        # transaction held open here.
        row = await waiter.fetchrow(
            fk.store.q["register_wait"],
            uuid.UUID(rid),
            claimed.lease_token,
            "got",
            0,
            "got",
            "event",
            "held",
            ["i"],
            "[1]",
            '{"i": 1}',
            '{"i": 1}',
            None,
            claimed.created_at,
            None,
            claimed.db_now,
        )
        assert row is not None and row["outcome"] == "waiting"
        sending = asyncio.create_task(fk.send_event("held", {"i": 1}))
        await _until_blocked(conn, sending)
        await tx.commit()
        sent = await sending
    finally:
        await waiter.close()
    assert sent.woken == [rid]
    await fk.advance(rid)
    assert await fk.result(rid, timeout=5) == {"i": 1}
