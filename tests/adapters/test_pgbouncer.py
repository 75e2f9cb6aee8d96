"""Pooled Postgres: a burst of concurrent invocations through PgBouncer in transaction mode,
and one process's connections bounded by its pool."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import asyncpg
import pytest

from flowkeeper import Context, FlowKeeper

from ..helpers import ClusterInfo, drive, make_fk, serve
from .conftest import ConnectionSampler
from .pgbouncer import PgBouncer, find_pgbouncer


@pytest.fixture(scope="module")
def pgbouncer(pg: ClusterInfo) -> Iterator[PgBouncer]:
    if find_pgbouncer() is None:
        pytest.skip("pgbouncer is not installed: apt-get install pgbouncer")
    bouncer = PgBouncer(pg.url, pool_size=4).start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


def pipeline(fk: FlowKeeper) -> None:
    async def work(i: int, stage: str) -> str:
        await asyncio.sleep(0.005)
        return f"{stage}-{i}"

    @fk.workflow("pipeline")
    async def run(ctx: Context, i: int) -> list[str]:
        return [await ctx.step(stage, work, i, stage) for stage in ("fetch", "enrich", "store")]


async def burst(fk: FlowKeeper, n: int) -> dict[str, str]:
    """Trigger ``n`` runs at once: each trigger pushes one invocation, all concurrent."""
    async with serve(fk):
        handles = await asyncio.gather(*(fk.trigger("pipeline", i) for i in range(n)))
        return await drive(fk, [h.run_id for h in handles], timeout=90, interval=0.2)


async def test_concurrent_invocations_through_pgbouncer_transaction_mode(
    database_url: str, pgbouncer: PgBouncer, caplog: pytest.LogCaptureFixture
) -> None:
    url = pgbouncer.url(database_url.rsplit("/", 1)[1])
    fk = make_fk(url + "?pgbouncer=true")
    assert fk.db.pooled
    pipeline(fk)
    caplog.set_level(logging.WARNING, logger="flowkeeper")
    try:
        statuses = await burst(fk, 150)
        outputs = {tuple((await fk.get_run(rid)).output) for rid in list(statuses)[:5]}
    finally:
        await fk.aclose()
    assert set(statuses.values()) == {"completed"}
    assert all(len(o) == 3 for o in outputs)
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == []


async def test_a_pooler_breaks_asyncpg_statement_cache_unless_detected(
    database_url: str, pgbouncer: PgBouncer
) -> None:
    """The control: the same pgbouncer fails the default asyncpg cache, so the test above
    would notice a pooled URL that was not detected."""
    url = pgbouncer.url(database_url.rsplit("/", 1)[1])
    pool = await asyncpg.create_pool(url, min_size=4, max_size=4)
    errors = 0

    async def query(i: int) -> None:
        nonlocal errors
        try:
            await pool.fetchval("SELECT $1::int + 1", i)
        except asyncpg.PostgresError:
            errors += 1

    try:
        await asyncio.gather(*(query(i) for i in range(400)))
    finally:
        await pool.close()
    assert errors > 0


async def test_200_concurrent_invocations_use_at_most_the_pool(
    database_url: str, connections: ConnectionSampler
) -> None:
    fk = make_fk(database_url)  # pool_size defaults to 5
    pipeline(fk)
    try:
        statuses = await burst(fk, 200)
    finally:
        await fk.aclose()
    assert set(statuses.values()) == {"completed"}
    assert connections.samples > 50
    assert 1 <= connections.peak <= 5


async def test_a_runs_stream_is_read_by_polling_through_pgbouncer(
    database_url: str, pgbouncer: PgBouncer
) -> None:
    """Behind a transaction pooler LISTEN cannot work: fk.stream polls, and misses nothing."""
    url = pgbouncer.url(database_url.rsplit("/", 1)[1])
    fk = make_fk(url + "?pgbouncer=true")
    assert fk.db.pooled

    async def talk(ctx: Context, n: int) -> int:
        for i in range(n):
            await ctx.publish("tick", i)
            await asyncio.sleep(0.02)
        return n

    @fk.workflow("talker")
    async def talker(ctx: Context) -> int:
        return await ctx.step("talk", talk, ctx, 10)

    try:
        async with serve(fk):
            handle = await fk.trigger("talker")
            got = [m.data async for m in fk.stream(handle.run_id)]
    finally:
        await fk.aclose()
    assert got == list(range(10))
