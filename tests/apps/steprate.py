"""The workflow of the step rate-limit fault test (served by tests.apps.steprate_app).

Each run of ``throttled-call`` executes one step under the step rate limit
``provider``, and each run of ``throttled-start`` is throttled by a run-level
limit of the same rate; the step body records when it started, on the database clock, into
``steprate_log`` (a body cut by a SIGKILL leaves its row too: that call was
made), so the test sees every call the provider would have seen.
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta

import asyncpg

from flowkeeper import Context, RateLimit, define_workflow

RATE = int(os.environ.get("STEPRATE_LIMIT", "20"))
LIMITS = {"provider": RateLimit(limit=RATE, period=timedelta(seconds=1))}

_pool: asyncpg.Pool | None = None


async def _log() -> asyncpg.Pool:
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=8)
    return _pool


async def call(run_id: str, n: int) -> int:
    pool = await _log()
    await pool.execute("INSERT INTO steprate_log (run_id) VALUES ($1)", run_id)
    await asyncio.sleep(0.05)  # the provider's answer takes a moment
    return n * 3


async def throttled_call(ctx: Context, n: int) -> int:
    await ctx.step("prepare", lambda: n)
    return await ctx.step("call", call, ctx.run_id, n, rate_limit="provider")


workflow = define_workflow("throttled-call", throttled_call)


async def throttled_start(ctx: Context, n: int) -> int:
    """Throttled as a whole run: its first step logs the start."""
    await ctx.step("start", call, ctx.run_id, n)
    return await ctx.step("finish", lambda: n * 3)


run_workflow = define_workflow(
    "throttled-start",
    throttled_start,
    rate_limit=RateLimit(limit=RATE, period=timedelta(seconds=1)),
)

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS steprate_log (
    id bigserial PRIMARY KEY,
    run_id uuid NOT NULL,
    started timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
