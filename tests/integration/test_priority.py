"""Priorities: higher first among due runs, without starving the rest."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from flowkeeper import ConfigurationError, Context, FlowKeeper
from flowkeeper.scheduler import Scheduler
from flowkeeper.testing import FakeClock

from ..helpers import make_fk, serve


async def test_higher_priority_first_but_a_long_wait_wins(
    fk: FlowKeeper, database_url: str, conn: asyncpg.Connection
) -> None:
    order: list[str] = []

    @fk.workflow("job", priority=0)
    async def job(ctx: Context, name: str) -> None:
        order.append(name)

    await fk.store.ensure_schema()
    clock = await FakeClock(conn).install()
    backlog = make_fk(database_url, endpoint=None)  # nobody pushes: a backlog for one tick
    backlog.register(fk.registry.get("job"))
    try:
        await backlog.trigger("job", "old-low")
        await clock.advance(timedelta(minutes=11))
        for i in range(3):
            await backlog.trigger("job", f"low-{i}")
        await backlog.trigger("job", "high", priority=10)
        await backlog.trigger("job", "higher", priority=20)
        with pytest.raises(ConfigurationError, match="priority"):
            await backlog.trigger("job", "x", priority=1001)
    finally:
        await backlog.aclose()
    assert fk.dispatcher is not None
    one_at_a_time = Scheduler(fk.store, fk.dispatcher, batch_size=1, concurrency=1)
    async with serve(fk):
        for _ in range(6):
            await one_at_a_time.tick(max_runs=1)
            await fk.tick(max_runs=0)  # (nothing: lets the background executions finish)
    # "higher" has 20 minutes of head start, more than old-low's 11 of waiting; "high"'s
    # 10 are less: the run that has waited longest goes before it.  Then first come.
    assert order == ["higher", "old-low", "high", "low-0", "low-1", "low-2"]
