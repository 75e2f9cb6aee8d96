"""A step's requested retry delay, end to end: the run's due_at stays within max_delay."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from flowkeeper import Context, FlowKeeper, RetryAfterError, RetryPolicy

from ..helpers import make_fk

POLICY = RetryPolicy(max_attempts=3, initial_delay=2, jitter=0, max_delay=120)


@pytest.fixture
async def local_fk(database_url: str) -> AsyncIterator[FlowKeeper]:
    instance = make_fk(database_url, endpoint=None)  # executed with fk.advance()
    try:
        yield instance
    finally:
        await instance.aclose()


class Foreign(Exception):
    def __init__(self, retry_after: Any) -> None:
        super().__init__("upstream said: later")
        self.retry_after = retry_after


async def _retry_wait(fk: FlowKeeper, conn: asyncpg.Connection, exc: BaseException) -> float:
    """Trigger a run whose step raises ``exc`` once; the seconds until its retry is due."""

    def step() -> str:
        raise exc

    @fk.workflow("w", retry=POLICY)
    async def w(ctx: Context) -> str:
        return await ctx.step("call", step)

    handle = await fk.trigger("w")
    result = await fk.advance(handle.run_id)
    assert getattr(result, "outcome", None) == "retrying", result
    row = await conn.fetchrow(
        "SELECT status, extract(epoch FROM due_at - now())::float8 AS wait "
        "FROM flowkeeper.runs WHERE id = $1",
        handle.run_id,
    )
    assert row["status"] == "retrying"
    wait: float = row["wait"]
    return wait


async def test_a_huge_requested_delay_is_capped_at_max_delay(
    local_fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    wait = await _retry_wait(local_fk, conn, RetryAfterError("429", delay=1e12))
    assert 110 < wait <= 120


async def test_a_requested_delay_past_timedelta_max_is_capped_too(
    local_fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    # 1e14 s does not fit in a timedelta: before the cap, the engine crashed on it.
    wait = await _retry_wait(local_fk, conn, RetryAfterError(delay=timedelta.max))
    assert 110 < wait <= 120


@pytest.mark.parametrize("value", [math.inf, math.nan, -30, "soon", 1e300])
async def test_a_foreign_retry_after_never_parks_or_crashes_the_run(
    local_fk: FlowKeeper, conn: asyncpg.Connection, value: Any
) -> None:
    wait = await _retry_wait(local_fk, conn, Foreign(value))
    expected = 120 if value == 1e300 else 2  # honoured within max_delay, else the backoff
    assert expected - 10 < wait <= expected
