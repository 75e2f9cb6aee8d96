"""ctx.transaction: the user's writes and the step's record commit together, once."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import asyncpg
import pytest
from pydantic import BaseModel

from flowkeeper import (
    Context,
    FlowKeeper,
    RetryPolicy,
    TransactionDatabaseError,
    TransactionUsageError,
)

from ..helpers import drive, serve

FAST = RetryPolicy(max_attempts=4, initial_delay=0.01, max_delay=0.01)

TABLES = """
CREATE TABLE orders (id bigserial PRIMARY KEY, run_id uuid NOT NULL, n int NOT NULL);
CREATE TABLE counters (id int PRIMARY KEY, v int NOT NULL);
INSERT INTO counters VALUES (1, 0);
"""


class Order(BaseModel):
    order_id: int
    n: int


async def test_writes_and_record_commit_together_and_replay_skips_them(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    await conn.execute(TABLES)
    calls: Counter[str] = Counter()

    async def record(c: asyncpg.Connection, run_id: str, n: int) -> Order:
        calls["record"] += 1
        order_id = await c.fetchval(
            "INSERT INTO orders (run_id, n) VALUES ($1, $2) RETURNING id", run_id, n
        )
        return Order(order_id=order_id, n=n)

    def after(order: Order) -> int:
        calls["after"] += 1
        return order.order_id

    @fk.workflow("tx")
    async def tx(ctx: Context, n: int) -> list[Any]:
        order = await ctx.transaction("record-order", record, ctx.run_id, n)
        assert isinstance(order, Order)  # restored as fn's annotation, now and on replay
        return [await ctx.step("after", after, order), order.n]

    async with serve(fk):
        run_id = (await fk.trigger("tx", 7)).run_id
        assert (await drive(fk, [run_id]))[run_id] == "completed"
        [row] = await conn.fetch("SELECT id, n FROM orders WHERE run_id = $1", run_id)
        assert await fk.result(run_id) == [row["id"], 7]
        step = await conn.fetchrow(
            "SELECT kind, output::text AS output, input::text AS input FROM flowkeeper.steps "
            "WHERE run_id = $1 AND key = 'record-order'",
            run_id,
        )
        assert step["kind"] == "transaction"
        assert json.loads(step["output"]) == {"order_id": row["id"], "n": 7}
        assert json.loads(step["input"])["args"] == [run_id, 7]  # the connection is not shown
        await fk.replay(run_id, from_step="after")
        assert (await drive(fk, [run_id]))[run_id] == "completed"
    assert calls == {"record": 1, "after": 2}
    assert await conn.fetchval("SELECT count(*) FROM orders") == 1


async def test_a_failure_rolls_back_and_is_retried_by_the_policy(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    await conn.execute(TABLES)
    attempts: Counter[str] = Counter()

    async def flaky(c: asyncpg.Connection, run_id: str) -> int:
        attempts["n"] += 1
        await c.execute("INSERT INTO orders (run_id, n) VALUES ($1, $2)", run_id, attempts["n"])
        if attempts["n"] < 3:
            raise RuntimeError("the write must not survive this")
        return attempts["n"]

    @fk.workflow("flaky-tx")
    async def flaky_tx(ctx: Context) -> int:
        return await ctx.transaction("t", flaky, ctx.run_id, retry=FAST)

    async with serve(fk):
        run_id = (await fk.trigger("flaky-tx")).run_id
        await drive(fk, [run_id])
        assert await fk.result(run_id) == 3
    assert [r["n"] for r in await conn.fetch("SELECT n FROM orders")] == [3]
    info = await fk.get_run(run_id)
    assert [s.attempts for s in info.steps] == [3]


async def test_a_real_serialization_failure_is_retried(
    fk: FlowKeeper, conn: asyncpg.Connection, database_url: str
) -> None:
    await conn.execute(TABLES)
    other = await asyncpg.connect(database_url)
    tries: list[str] = []

    async def bump(c: asyncpg.Connection) -> int:
        v = await c.fetchval("SELECT v FROM counters WHERE id = 1")  # the snapshot is taken
        if not tries:
            await other.execute("UPDATE counters SET v = v + 100 WHERE id = 1")  # commits
        tries.append("try")
        # Under REPEATABLE READ, updating a row changed since the snapshot: SQLSTATE 40001.
        await c.execute("UPDATE counters SET v = $1 WHERE id = 1", v + 1)
        return int(v) + 1

    @fk.workflow("ser")
    async def ser(ctx: Context) -> int:
        return await ctx.transaction("bump", bump, retry=FAST, isolation="repeatable_read")

    try:
        async with serve(fk):
            run_id = (await fk.trigger("ser")).run_id
            await drive(fk, [run_id])
            assert await fk.result(run_id) == 101
    finally:
        await other.close()
    assert len(tries) == 2
    assert await conn.fetchval("SELECT v FROM counters") == 101
    info = await fk.get_run(run_id)
    failed = [e for e in info.events if e.kind == "attempt_failed"]
    assert "SerializationError" in str(failed[0].detail)


@pytest.mark.parametrize("misuse", ["sync", "commits", "swallows"])
async def test_a_misbehaving_function_fails_at_once_with_nothing_written(
    fk: FlowKeeper, conn: asyncpg.Connection, misuse: str
) -> None:
    await conn.execute(TABLES)

    def sync_fn(c: asyncpg.Connection) -> int:
        return 1

    async def commits(c: asyncpg.Connection, run_id: str) -> int:
        await c.execute("COMMIT")
        return 1

    async def swallows(c: asyncpg.Connection, run_id: str) -> int:
        await c.execute("INSERT INTO orders (run_id, n) VALUES ($1, 1)", run_id)
        try:
            await c.execute("SELECT 1 / 0")
        except asyncpg.DivisionByZeroError:
            pass
        return 1

    @fk.workflow("misuse")
    async def wf(ctx: Context) -> int:
        if misuse == "sync":
            return await ctx.transaction("t", sync_fn, retry=FAST)  # type: ignore[arg-type]
        fn = commits if misuse == "commits" else swallows
        return await ctx.transaction("t", fn, ctx.run_id, retry=FAST)

    async with serve(fk):
        run_id = (await fk.trigger("misuse")).run_id
        assert (await drive(fk, [run_id]))[run_id] == "failed"
    info = await fk.get_run(run_id)
    assert info.error is not None
    assert info.error["type"] == TransactionUsageError.__module__ + ".TransactionUsageError"
    assert info.steps[0].attempts == 1  # never retried: no retry can fix it
    assert info.steps[0].kind == "transaction"
    assert await conn.fetchval("SELECT count(*) FROM orders") == 0


async def test_a_pool_of_another_database_is_refused(
    fk: FlowKeeper, empty_database_url: str, database_url: str, conn: asyncpg.Connection
) -> None:
    await conn.execute(TABLES)
    seen: list[str] = []

    async def write(c: asyncpg.Connection) -> int:
        seen.append("ran")
        return 1

    empty = await asyncpg.create_pool(empty_database_url, min_size=1, max_size=2)
    other_fk = await asyncpg.create_pool(database_url.rsplit("/", 1)[0] + "/fk_template")

    @fk.workflow("elsewhere")
    async def elsewhere(ctx: Context, which: str) -> int:
        pool = empty if which == "empty" else other_fk
        return await ctx.transaction("t", write, pool=pool)

    try:
        async with serve(fk):
            runs = [(await fk.trigger("elsewhere", w)).run_id for w in ("empty", "other")]
            await drive(fk, runs)
    finally:
        await empty.close()
        await other_fk.close()
    messages = []
    for rid in runs:
        info = await fk.get_run(rid)
        assert info.status.value == "failed"
        assert info.error is not None
        assert (
            info.error["type"] == TransactionDatabaseError.__module__ + ".TransactionDatabaseError"
        )
        messages.append(info.error["message"])
    assert "no flowkeeper schema" in messages[0]
    assert "another database" in messages[1]
    assert not seen  # refused before the function ran
