"""The workflows of the fault tests, run in a uvicorn subprocess that the tests SIGKILL.

Each step body first asks Postgres whether its own result was already
recorded, and logs that answer with the execution into ``fault_log``: a row
with ``recorded_before = true`` is a recorded step that ran again — the one
thing flowkeeper promises never happens.
"""

from __future__ import annotations

import asyncio
import os
import random

import asyncpg

from flowkeeper import Context, define_workflow

STEPS = int(os.environ.get("FAULT_STEPS", "5"))
# The longest a step body takes (seconds); each takes a random part of it.
STEP_DELAY = float(os.environ.get("FAULT_STEP_DELAY", "0.04"))
# How long the "slow" step of the stalling workflow takes (seconds).
SLOW_STEP = float(os.environ.get("FAULT_SLOW_STEP", "2.0"))
STALLING_STEPS = 3

_pool: asyncpg.Pool | None = None


async def _log_pool() -> asyncpg.Pool:
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=4)
    return _pool


async def side_effect(run_id: str, key: str) -> str:
    pool = await _log_pool()
    async with pool.acquire() as conn:
        await conn.execute(
            """INSERT INTO fault_log (run_id, key, recorded_before)
               SELECT $1, $2, EXISTS (SELECT 1 FROM flowkeeper.steps
                                      WHERE run_id = $1 AND key = $2 AND status = 'completed')""",
            run_id,
            key,
        )
    await asyncio.sleep(random.uniform(STEP_DELAY / 8, STEP_DELAY))
    return key


async def slow_effect(run_id: str, key: str) -> int:
    """A step that outlives its lease when its process is stopped; returns who ran it."""
    await side_effect(run_id, key)
    await asyncio.sleep(SLOW_STEP)
    return os.getpid()


async def crashy(ctx: Context, n: int) -> int:
    done = 0
    for i in range(STEPS):
        await ctx.step(f"step-{i}", side_effect, ctx.run_id, f"step-{i}")
        done += 1
        if i == STEPS // 2:
            await ctx.sleep("breather", 0.05)
    return n + done


async def stalling(ctx: Context, n: int) -> int:
    await ctx.step("before", side_effect, ctx.run_id, "before")
    await ctx.step("slow", slow_effect, ctx.run_id, "slow")
    await ctx.step("after", side_effect, ctx.run_id, "after")
    return n + STALLING_STEPS


crashy_workflow = define_workflow("crashy", crashy)
stalling_workflow = define_workflow("stalling", stalling)

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS fault_log (
    id bigserial PRIMARY KEY,
    run_id uuid NOT NULL,
    key text NOT NULL,
    recorded_before boolean NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
