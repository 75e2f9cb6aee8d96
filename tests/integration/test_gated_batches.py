"""Flow-controlled writes share group commit batches without deadlocking each other.

A batch is one transaction: the gates of the flow-controlled runs it creates
and the slot releases of the runs it ends each lock their concurrency keys
(and rate keys), and two batches taking the same keys in different orders
would deadlock (Postgres finds it after deadlock_timeout, a second; the batch
is then sent again write by write).  So a batch of several such writes takes
all their keys first, in key order (flow_prelock, migration 0019).

Forced here: a pool of two connections, hundreds of creates and ends at once
whose keys overlap in every order, limits that bind on some keys, rate keys
on others.  No batch may be refused, no write fail, no key over its limit,
and every parked run must start once the slots free.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from flowkeeper import Concurrency, Context, FlowKeeper, RateLimit
from flowkeeper.groupcommit import BatchRefused
from flowkeeper.store import ClaimedRun

from ..helpers import KEY

LEASE = timedelta(seconds=60)
# Keys that look like SQL, quoting and array syntax, or are not ASCII: they
# travel as text[] through flow_prelock and the gates.
KEYS = ["a", "b", "k'; --", 'q"{,}', "é🙂", "f"]


def _counting_refusals(fk: FlowKeeper) -> list[BaseException]:
    """Wrap the store's batch writer: every batch Postgres rolled back is kept."""
    refused: list[BaseException] = []
    inner = fk.store._call_many

    async def call_many(writes: Any) -> list[Any]:
        try:
            return await inner(writes)
        except BatchRefused as exc:
            refused.append(exc.__cause__ or exc)
            raise

    fk.store._call_many = call_many  # type: ignore[method-assign]
    return refused


async def _deadlocks(conn: asyncpg.Connection) -> int:
    await conn.execute("SELECT pg_stat_force_next_flush()")
    return int(
        await conn.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )
    )


@pytest.mark.parametrize("limit", [1000, 3])
async def test_crossing_batches_of_gates_and_releases(database_url: str, limit: int) -> None:
    fk = FlowKeeper(database_url, signing_key=KEY, pool_size=2)

    # Each run holds two keys of six, in a shuffled order: batches cross.
    @fk.workflow(
        "crossing",
        concurrency=[
            Concurrency(limit=limit, key=lambda inp: inp["ks"][0], scope="shared"),
            Concurrency(limit=limit, key=lambda inp: inp["ks"][1], scope="shared"),
        ],
    )
    async def crossing(ctx: Context, inp: dict[str, Any]) -> None:
        return None

    # Rate keys lock rows of their own (rate_limits): those cross as well.
    @fk.workflow(
        "rated",
        rate_limit=[
            RateLimit(limit=100_000, period=timedelta(seconds=1), key=lambda inp: inp["ks"][0]),
            RateLimit(limit=100_000, period=timedelta(seconds=1), key=lambda inp: inp["ks"][1]),
        ],
    )
    async def rated(ctx: Context, inp: dict[str, Any]) -> None:
        return None

    store = fk.store
    refused = _counting_refusals(fk)
    rng = random.Random(limit)
    try:
        await store.ensure_schema()
        async with fk.db.acquire() as conn:
            deadlocks_before = await _deadlocks(conn)

        async def create(workflow: str) -> tuple[str, Any]:
            run_id = str(uuid.uuid4())
            text = json.dumps({"ks": rng.sample(KEYS, 2)})
            wf = fk.registry.get(workflow)
            got = await store.create_gated(
                run_id=run_id,
                workflow=workflow,
                input_json=text,
                idempotency_key=None,
                lease=LEASE,
                flow=wf.flow(text),
                priority=0,
                timeout=None,
                start_timeout=None,
            )
            return run_id, got

        made = await asyncio.gather(*(create("crossing" if i % 3 else "rated") for i in range(360)))
        claimed = {r: c for r, c in made if isinstance(c, ClaimedRun)}
        assert all(c is None or isinstance(c, ClaimedRun) for _, c in made)

        async def held_per_key() -> dict[str, int]:
            async with fk.db.acquire() as conn:
                rows = await conn.fetch(
                    """SELECT s.key, count(*) AS n FROM flowkeeper.slots s
                       JOIN flowkeeper.runs r ON r.id = s.run_id
                       WHERE r.executing AND r.lease_token IS NOT NULL GROUP BY s.key"""
                )
            return {r["key"]: r["n"] for r in rows}

        assert max((await held_per_key()).values()) <= limit
        async with fk.db.acquire() as conn:
            blocked = await conn.fetchval(
                "SELECT count(*) FROM flowkeeper.runs WHERE blocked_key IS NOT NULL"
            )
        if limit == 1000:
            # Not claimed at once: only rated runs, throttled by microseconds (a
            # batch's runs share its transaction's clock), none over a limit.
            assert blocked == 0
        else:
            assert blocked, "a limit of 3 over six keys must park some of 240 runs"

        # End every claimed run at once (the releases cross too), then whatever
        # they woke, until nothing is left: every parked run gets its turn.
        finished: set[str] = set()
        for _ in range(200):
            if not claimed and finished == {r for r, _ in made}:
                break
            if not claimed:  # throttled runs due in a moment
                await asyncio.sleep(0.01)
            ends = await asyncio.gather(
                *(
                    store.commit(r, c.lease_token, status="completed", output="null", flow=True)
                    for r, c in claimed.items()
                )
            )
            assert all(e is not False for e in ends)
            finished |= set(claimed)
            claimed = {}
            async with fk.db.acquire() as conn:  # woken by the releases, or throttled
                ready = await conn.fetch(
                    "SELECT id::text FROM flowkeeper.runs WHERE status = 'queued'"
                    " AND blocked_key IS NULL"
                )
            for (run_id,) in ready:
                got = await store.claim(run_id, None, uuid.uuid4(), LEASE)
                if got is not None:
                    claimed[run_id] = got
            assert max((await held_per_key()).values(), default=0) <= limit
        assert finished == {r for r, _ in made}

        async with fk.db.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM flowkeeper.slots") == 0
            deadlocks = await _deadlocks(conn) - deadlocks_before
        assert store._group().batches > 0, "the writes never shared a transaction"
        assert not refused, f"{len(refused)} batches rolled back: {refused[:3]}"
        assert deadlocks == 0
    finally:
        await fk.aclose()


@pytest.mark.parametrize(
    ("kind", "merged"),
    [("ends", True), ("ends", False), ("creates", True)],
    ids=["ends-one-statement", "ends-statement-by-statement", "creates-one-statement"],
)
async def test_batches_taking_keys_in_opposite_orders_wait_instead_of_deadlocking(
    database_url: str, kind: str, merged: bool
) -> None:
    """Batch A ends (or creates) a run of key a, then one of key b; batch B one of
    b, then one of a.  Key a is held elsewhere while both start, so without the
    prelock A would hold a and wait for b while B held b and waited for a: a
    deadlock every time.  The prelock is taken by the merged statement itself
    (one statement) or on its own first (merging off).  The creates repeat an
    id, so that they are gated run by run, each locking its own key."""
    fk = FlowKeeper(database_url, signing_key=KEY, pool_size=3)

    @fk.workflow("one", concurrency=Concurrency(limit=10, key=lambda inp: inp["k"]))
    async def one(ctx: Context, inp: dict[str, Any]) -> None:
        return None

    store = fk.store
    store.merge_commits = merged
    refused = _counting_refusals(fk)
    wf = fk.registry.get("one")
    blocker = await asyncpg.connect(database_url)
    try:
        await store.ensure_schema()
        deadlocks_before = await _deadlocks(blocker)
        claimed: dict[str, ClaimedRun] = {}
        for name, key in [("a1", "a"), ("b1", "b"), ("b2", "b"), ("a2", "a")]:
            text = json.dumps({"k": key})
            got = await store.create_gated(
                run_id=str(uuid.uuid4()), workflow="one", input_json=text,
                idempotency_key=None, lease=LEASE, flow=wf.flow(text), priority=0,
                timeout=None, start_timeout=None,
            )  # fmt: skip
            assert isinstance(got, ClaimedRun)
            claimed[name] = got

        def end(name: str) -> tuple[str, tuple[Any, ...]]:
            """commit_lean's arguments completing the run (no steps): it frees its slot."""
            run = claimed[name]
            store._flow_writes[uuid.UUID(run.run_id)] = 1
            head = (uuid.UUID(run.run_id), run.lease_token, "completed", None, None, None)
            return "commit_lean", (*head, '"done"', None, None, 0, *[[]] * 13, False)

        async def waiting() -> int:
            return int(
                await blocker.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
            )

        key_a = wf.flow(json.dumps({"k": "a"})).keys[0]
        hold = blocker.transaction()
        await hold.start()
        await blocker.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"flowkeeper.slot:{key_a}"
        )

        def create(run_id: str, key: str) -> tuple[str, tuple[Any, ...]]:
            """create_gated_run's arguments, as Store.create_gated builds them."""
            text = json.dumps({"k": key})
            flow = wf.flow(text)
            return "create_gated_run", store.insert_args(
                run_id=run_id, workflow="one", input_json=text, idempotency_key=None,
                lease_token=uuid.uuid4(), lease=LEASE, flow_keys=flow.keys,
                flow_limits=flow.limits,
            )  # fmt: skip

        def batch(*keys: str) -> list[tuple[str, tuple[Any, ...]]]:
            ids = [str(uuid.uuid4()) for _ in keys]
            return [create(i, k) for i, k in zip(ids, keys, strict=True)] + [
                create(ids[-1], keys[-1])
            ]

        if kind == "ends":
            one_way, other_way = [end("a1"), end("b1")], [end("b2"), end("a2")]
        else:
            one_way, other_way = batch("a", "b"), batch("b", "a")
        first = asyncio.create_task(store._call_many(one_way))
        while await waiting() < 1:
            await asyncio.sleep(0.01)
        second = asyncio.create_task(store._call_many(other_way))
        while await waiting() < 2:
            await asyncio.sleep(0.01)
        await hold.rollback()
        rows = await asyncio.wait_for(asyncio.gather(first, second), 30)
        assert refused == []
        assert all(row is not None for batch in rows for row in batch)
        assert await _deadlocks(blocker) == deadlocks_before
        left = await blocker.fetchval("SELECT count(*) FROM flowkeeper.slots")
        assert left == (0 if kind == "ends" else 4 + 4)  # ends free theirs; creates take one each
    finally:
        await blocker.close()
        await fk.aclose()
