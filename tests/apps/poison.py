"""The poison workload's workflows, served by ``tests.apps.poison_app`` under uvicorn.

Every step body logs its execution into ``poison_log`` from its own
connection: when it started, when it ended (written in a ``finally``, so a
body that raises or is cancelled still has an end; a body killed with its
process has none), the process it ran in, and whether its own result was
already recorded when it started (``recorded_before``: a recorded step that
ran again, which flowkeeper promises never happens).  A process that ends
itself writes the moment into ``poison_deaths`` first; the test writes there
when it SIGKILLs the server, so the checker can give each killed body an end.

The workflows, by kind (see :data:`KINDS`):

- ``normal``: four steps around a durable sleep, completes with ``n + 6``;
- ``cart``: a step returns a dict (keys deliberately out of sorted order),
  then each item is charged by its own step after a durable sleep: the run
  returns the items charged, which must be the dict's keys in insertion order;
- ``nan``: a step returns NaN: the run fails with SerializationError, the
  body never loops;
- ``nul``: a step raises an error whose message holds NUL and a lone
  surrogate: retried per policy, then the run fails with the message stored;
- ``sync``: a sync step overruns its timeout each time: the run fails after
  its attempts, which never overlap (each waits for the last one's thread);
- ``exit``: a step ends its own process with ``os._exit`` on its first
  execution when the input says so, then succeeds on its retry;
- ``fan``: a 3-way gather of steps, then two child runs (``poison-leaf``,
  one step each) waited for: completes with ``n + 36``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg

from flowkeeper import Context, RetryPolicy, define_workflow

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS poison_log (
    id bigserial PRIMARY KEY,
    run_id uuid NOT NULL,
    key text NOT NULL,
    item text,
    pid integer NOT NULL,
    recorded_before boolean NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at timestamptz,
    outcome text
);
CREATE TABLE IF NOT EXISTS poison_deaths (
    id bigserial PRIMARY KEY,
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    how text NOT NULL
);
"""

KINDS = ("normal", "cart", "nan", "nul", "sync", "exit", "fan")

# Fast policies: the workload must end within seconds, kills and all.
FAST = RetryPolicy(max_attempts=5, initial_delay=0.05, backoff=1, jitter=0)
NUL_RETRY = RetryPolicy(max_attempts=3, initial_delay=0.05, backoff=1, jitter=0)
SYNC_RETRY = RetryPolicy(max_attempts=3, initial_delay=0, jitter=0)
EXIT_RETRY = RetryPolicy(max_attempts=3, initial_delay=0, jitter=0)

SYNC_TIMEOUT = 0.3
SYNC_SLEEP = 1.0  # how long the overrunning sync step really takes
ITEMS = ("zeta", "alpha", "mike", "bravo", "kilo")
NUL_MESSAGE = "card\x00declined \ud800 by the bank"

_START = """
INSERT INTO poison_log (run_id, key, item, pid, recorded_before)
SELECT $1, $2, $3, $4, EXISTS (SELECT 1 FROM flowkeeper.steps
                               WHERE run_id = $1 AND key = $2 AND status = 'completed')
RETURNING id, (SELECT count(*) FROM poison_log WHERE run_id = $1 AND key = $2) AS before
"""
_END = "UPDATE poison_log SET ended_at = clock_timestamp(), outcome = $2 WHERE id = $1"

_pool: asyncpg.Pool | None = None


async def _log_pool() -> asyncpg.Pool:
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=4)
    return _pool


@contextlib.asynccontextmanager
async def logged(run_id: str, key: str, item: str | None = None) -> AsyncIterator[int]:
    """Log one execution of a step body; yields how many executions came before it."""
    pool = await _log_pool()
    async with pool.acquire() as conn:
        row = await conn.fetchrow(_START, run_id, key, item, os.getpid())
    assert row is not None
    outcome = "error"
    try:
        yield int(row["before"])
        outcome = "ok"
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    finally:
        async with pool.acquire() as conn:
            await conn.execute(_END, row["id"], outcome)


@contextlib.contextmanager
def logged_sync(run_id: str, key: str) -> Iterator[None]:
    """:func:`logged` for a sync body, in its step thread (a connection of its own)."""

    async def call(query: str, *args: Any) -> Any:
        conn = await asyncpg.connect(os.environ["DATABASE_URL"])
        try:
            return await conn.fetchrow(query, *args)
        finally:
            await conn.close()

    row = asyncio.run(call(_START, run_id, key, None, os.getpid()))
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        asyncio.run(call(_END, row["id"], outcome))


# step bodies ---------------------------------------------------------------
async def work(run_id: str, key: str, value: int) -> int:
    async with logged(run_id, key):
        await asyncio.sleep(random.uniform(0.005, 0.04))
        return value


def cart_order(seed: int) -> list[str]:
    """The insertion order of run ``seed``'s cart: never sorted, never the same twice."""
    order = list(ITEMS)
    random.Random(seed).shuffle(order)
    if order == sorted(order):
        order.reverse()
    return order


async def load_cart(run_id: str, key: str, seed: int) -> dict[str, int]:
    async with logged(run_id, key):
        await asyncio.sleep(random.uniform(0.005, 0.02))
        return {item: 100 + ITEMS.index(item) for item in cart_order(seed)}


async def charge(run_id: str, key: str, item: str, cents: int) -> str:
    async with logged(run_id, key, item):
        await asyncio.sleep(random.uniform(0.005, 0.03))
        return item


async def nan_value(run_id: str, key: str) -> float:
    async with logged(run_id, key):
        return float("nan")


async def nul_error(run_id: str, key: str) -> None:
    async with logged(run_id, key):
        await asyncio.sleep(0.01)
        raise ValueError(NUL_MESSAGE)


def overrun(run_id: str, key: str) -> str:
    with logged_sync(run_id, key):
        time.sleep(SYNC_SLEEP)
        return "too late"


async def maybe_exit(run_id: str, key: str, deadly: bool) -> str:
    async with logged(run_id, key) as before:
        if deadly and before == 0:
            pool = await _log_pool()
            async with pool.acquire() as conn:
                await conn.execute(
                    "INSERT INTO poison_deaths (pid, how) VALUES ($1, 'os._exit')", os.getpid()
                )
            os._exit(17)
        await asyncio.sleep(0.01)
        return f"survived after {before}"


# workflows -------------------------------------------------------------------
def step_key(name: str, index: int) -> str:
    """The key flowkeeper gives occurrence ``index`` (0-based) of a repeated name."""
    return name if index == 0 else f"{name}#{index + 1}"


async def normal(ctx: Context, n: int) -> int:
    total = 0
    for i in range(4):
        total += await ctx.step(f"s{i}", work, ctx.run_id, f"s{i}", i)
        if i == 1:
            await ctx.sleep("pause", 0.1)
    return n + total


async def cart(ctx: Context, seed: int) -> list[str]:
    items = await ctx.step("load-cart", load_cart, ctx.run_id, "load-cart", seed)
    charged: list[str] = []
    for i, (item, cents) in enumerate(items.items()):
        await ctx.sleep("between", 0.05)
        charged.append(
            await ctx.step("charge", charge, ctx.run_id, step_key("charge", i), item, cents)
        )
    return charged


async def nan(ctx: Context, n: int) -> int:
    await ctx.step("before", work, ctx.run_id, "before", n)
    await ctx.step("nan", nan_value, ctx.run_id, "nan")
    return n


async def nul(ctx: Context, n: int) -> int:
    await ctx.step("before", work, ctx.run_id, "before", n)
    await ctx.step("nul", nul_error, ctx.run_id, "nul", retry=NUL_RETRY)
    return n


async def sync(ctx: Context, n: int) -> int:
    await ctx.step("before", work, ctx.run_id, "before", n)
    await ctx.step(
        "overrun", overrun, ctx.run_id, "overrun", retry=SYNC_RETRY, timeout=SYNC_TIMEOUT
    )
    return n


async def exiting(ctx: Context, spec: dict[str, int]) -> int:
    n = spec["n"]
    await ctx.step("before", work, ctx.run_id, "before", n)
    await ctx.step("exit", maybe_exit, ctx.run_id, "exit", bool(spec["deadly"]), retry=EXIT_RETRY)
    await ctx.step("after", work, ctx.run_id, "after", n)
    return n


async def leaf(ctx: Context, value: int) -> int:
    return int(await ctx.step("leaf", work, ctx.run_id, "leaf", value))


async def fan(ctx: Context, n: int) -> int:
    parts = await asyncio.gather(
        *(ctx.step(f"p{i}", work, ctx.run_id, f"p{i}", i + 1) for i in range(3))
    )
    kids = [await ctx.start_child(f"kid{i}", "poison-leaf", 10 * (i + 1)) for i in range(2)]
    return n + sum(parts) + sum(await ctx.wait_for_children(kids))


WORKFLOWS = [
    define_workflow("poison-normal", normal, retry=FAST),
    define_workflow("poison-cart", cart, retry=FAST),
    define_workflow("poison-nan", nan, retry=FAST),
    define_workflow("poison-nul", nul, retry=FAST),
    define_workflow("poison-sync", sync, retry=FAST),
    define_workflow("poison-exit", exiting, retry=FAST),
    define_workflow("poison-fan", fan, retry=FAST),
    define_workflow("poison-leaf", leaf, retry=FAST),
]
