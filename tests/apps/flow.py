"""The workflow of the flow-control fault test (served by tests.apps.flow_app).

Each run of ``limited`` executes one step whose body records when it started
and ended, on the database clock, into ``flow_log``; the test computes from
those spans how many runs of one key executed at once.
"""

from __future__ import annotations

import asyncio
import os
import random

import asyncpg
import pydantic

from flowkeeper import Concurrency, Context, define_workflow

LIMIT = int(os.environ.get("FLOW_LIMIT", "3"))
STEP = float(os.environ.get("FLOW_STEP", "0.05"))

_pool: asyncpg.Pool | None = None


class Job(pydantic.BaseModel):
    key: str
    n: int


async def _log() -> asyncpg.Pool:
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=8)
    return _pool


async def work(run_id: str, key: str) -> str:
    pool = await _log()
    span = await pool.fetchval(
        "INSERT INTO flow_log (run_id, key) VALUES ($1, $2) RETURNING id", run_id, key
    )
    await asyncio.sleep(random.uniform(STEP / 4, STEP))
    await pool.execute("UPDATE flow_log SET ended = clock_timestamp() WHERE id = $1", span)
    return key


async def limited(ctx: Context, job: Job) -> int:
    await ctx.step("work", work, ctx.run_id, job.key)
    if job.n % 5 == 0:
        await ctx.sleep("nap", 0.05)  # a sleeping run holds no slot
        await ctx.step("again", work, ctx.run_id, job.key)
    return job.n


limited_workflow = define_workflow(
    "limited", limited, concurrency=Concurrency(limit=LIMIT, key=lambda job: job.key)
)

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS flow_log (
    id bigserial PRIMARY KEY,
    run_id uuid NOT NULL,
    key text NOT NULL,
    started timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended timestamptz
)
"""
