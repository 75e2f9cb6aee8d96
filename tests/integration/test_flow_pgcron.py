"""The pg_cron driver obeys the same concurrency limits: they live in the claim."""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from flowkeeper import Concurrency, Context, RateLimit, define_workflow
from flowkeeper.pgcron import PgCron
from flowkeeper.testing import FakeClock
from flowkeeper.workflow import Workflow

from ..helpers import KEY, busiest_window, make_fk, serve, wait_for
from .test_concurrency import Spans, max_overlap
from .test_pgcron import needs_pg_cron, needs_plpython


async def _driven_by_pg_cron(
    database_url: str,
    conn: asyncpg.Connection,
    wf: Workflow,
    n: int,
    *,
    every: float,
    **options: Any,
) -> float:
    """Trigger ``n`` runs of ``wf`` with nobody pushing, then only pg_cron's tick
    drives them (called every ``every`` seconds) until all complete; the time taken."""
    trigger_side = make_fk(database_url, endpoint=None)
    trigger_side.register(wf)
    fk = make_fk(database_url, **options)
    fk.register(wf)
    installer = PgCron(database_url)
    try:
        ids = [(await trigger_side.trigger(wf.name, i)).run_id for i in range(n)]
        await installer.install(endpoint=fk.dispatcher.endpoint, signing_key=KEY, every="1m")  # type: ignore[union-attr]
        async with serve(fk):

            async def done() -> bool:
                await conn.execute("CALL flowkeeper.pgcron_tick()")
                finished = await conn.fetchval(
                    "SELECT count(*) FROM flowkeeper.runs WHERE status = 'completed'"
                )
                return bool(finished == len(ids))

            t0 = time.monotonic()
            await wait_for(done, timeout=max(30.0, 30 * every), interval=every)
            return time.monotonic() - t0
    finally:
        with contextlib.suppress(Exception):
            await installer.uninstall()
        await trigger_side.aclose()
        await fk.aclose()


@needs_pg_cron
@needs_plpython
async def test_pg_cron_ticks_respect_the_limit(database_url: str, conn: asyncpg.Connection) -> None:
    spans = Spans()

    async def capped(ctx: Context, n: int) -> int:
        await ctx.step("work", spans.work, "all", 0.3)
        return n

    wf = define_workflow("capped", capped, concurrency=Concurrency(limit=2))
    took = await _driven_by_pg_cron(database_url, conn, wf, 8, every=0.1)
    assert max_overlap(spans.spans, "all") == 2
    assert spans.peak["all"] == 2
    assert took >= 4 * 0.3  # four rounds of two
    parked = await conn.fetchval("SELECT count(*) FROM flowkeeper.events WHERE kind = 'blocked'")
    assert parked >= 6


@needs_pg_cron
@needs_plpython
async def test_pg_cron_fires_a_cron_slot_through_the_endpoint_tick(
    database_url: str, conn: asyncpg.Connection
) -> None:
    seen: list[datetime] = []
    fk = make_fk(database_url)

    @fk.workflow("nightly", cron="0 3 * * *", timezone="Europe/Berlin")
    async def nightly(ctx: Context, slot: datetime) -> None:
        seen.append(slot)

    await fk.store.ensure_schema()
    clock = await FakeClock(conn).install()
    await clock.travel_to(datetime(2026, 6, 1, 0, tzinfo=UTC))
    installer = PgCron(database_url)
    try:
        await installer.install(endpoint=fk.dispatcher.endpoint, signing_key=KEY, every="1m")  # type: ignore[union-attr]
        async with serve(fk):
            await fk.reconcile()
            await clock.travel_to(datetime(2026, 6, 1, 1, 0, 30, tzinfo=UTC))  # 03:00:30 CEST

            async def ran() -> bool:
                await conn.execute("CALL flowkeeper.pgcron_tick()")
                return bool(seen)

            await wait_for(ran, timeout=20, interval=0.2)
    finally:
        with contextlib.suppress(Exception):
            await installer.uninstall()
        await fk.aclose()
    assert seen == [datetime(2026, 6, 1, 1, tzinfo=UTC)]
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == 1


@needs_pg_cron
@needs_plpython
async def test_pg_cron_ticks_respect_a_rate_limit(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """Only pg_cron drives, every 2 s (its minute, scaled down): 40 runs under
    10/s start no faster than the limit, each once, and all finish."""
    starts: dict[int, float] = {}

    async def paced(ctx: Context, n: int) -> int:
        await ctx.step("start", lambda: starts.setdefault(n, time.monotonic()))
        return n

    wf = define_workflow("paced", paced, rate_limit=RateLimit(10, timedelta(seconds=1)))
    await _driven_by_pg_cron(database_url, conn, wf, 40, every=2.0, time_budget=2.0)
    assert sorted(starts) == list(range(40))
    busiest = busiest_window(starts.values())
    print(f"\npg_cron every 2 s, 10/s: busiest second {busiest}")
    assert busiest <= 12
