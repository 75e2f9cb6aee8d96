"""Workflows of bench/payments.py: three steps, the middle one a plain or a transaction step."""

from __future__ import annotations

import os

import asyncpg

from flowkeeper import Context, define_workflow

from .workflows import noop

ORDERS_SQL = "CREATE TABLE IF NOT EXISTS bench_orders (id bigserial PRIMARY KEY, n int NOT NULL)"

_pool: asyncpg.Pool | None = None


async def _app_pool() -> asyncpg.Pool:
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=5)
    return _pool


async def insert_own_connection(n: int) -> int:
    """What a plain step writing to the app's table does: its own commit."""
    pool = await _app_pool()
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO bench_orders (n) VALUES ($1)", n)
    return n + 1


async def insert_in_transaction(conn: asyncpg.Connection, n: int) -> int:
    await conn.execute("INSERT INTO bench_orders (n) VALUES ($1)", n)
    return n + 1


async def three_plain_write(ctx: Context, n: int) -> int:
    n = await ctx.step("one", noop, n)
    n = await ctx.step("two", insert_own_connection, n)
    return await ctx.step("three", noop, n)


async def three_tx(ctx: Context, n: int) -> int:
    n = await ctx.step("one", noop, n)
    n = await ctx.transaction("two", insert_in_transaction, n)
    return await ctx.step("three", noop, n)


PAYMENT_WORKFLOWS = {
    "three-plain-write": define_workflow("three-plain-write", three_plain_write),
    "three-tx": define_workflow("three-tx", three_tx),
}
