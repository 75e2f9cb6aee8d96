"""ctx.transaction through PgBouncer in transaction mode: one server connection per
transaction, no session state, every order written once with its record."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from flowkeeper import Context

from ..helpers import ClusterInfo, drive, make_fk, serve
from .pgbouncer import PgBouncer, find_pgbouncer


@pytest.fixture(scope="module")
def bouncer(pg: ClusterInfo) -> Iterator[PgBouncer]:
    if find_pgbouncer() is None:
        pytest.skip("pgbouncer is not installed: apt-get install pgbouncer")
    b = PgBouncer(pg.url, pool_size=3).start()
    try:
        yield b
    finally:
        b.stop()


async def test_transaction_steps_through_pgbouncer(
    database_url: str, bouncer: PgBouncer, conn: asyncpg.Connection
) -> None:
    await conn.execute("CREATE TABLE orders (run_id uuid PRIMARY KEY, n int NOT NULL)")
    fk = make_fk(bouncer.url(database_url.rsplit("/", 1)[1]) + "?pgbouncer=true")
    assert fk.db.pooled

    async def record(c: asyncpg.Connection, run_id: str, n: int) -> int:
        await c.execute("INSERT INTO orders (run_id, n) VALUES ($1, $2)", run_id, n)
        await asyncio.sleep(0.002)
        return int(await c.fetchval("SELECT n FROM orders WHERE run_id = $1", run_id))

    @fk.workflow("pooled-tx")
    async def pooled(ctx: Context, n: int) -> int:
        value = await ctx.transaction("record", record, ctx.run_id, n)
        return await ctx.step("double", lambda v: v * 2, value)

    try:
        async with serve(fk):
            handles = await asyncio.gather(*(fk.trigger("pooled-tx", i) for i in range(40)))
            statuses = await drive(fk, [h.run_id for h in handles], timeout=60)
            outputs = {h.run_id: await fk.result(h.run_id) for h in handles}
    finally:
        await fk.aclose()
    assert set(statuses.values()) == {"completed"}
    rows = {str(r["run_id"]): r["n"] for r in await conn.fetch("SELECT * FROM orders")}
    assert len(rows) == 40
    assert all(outputs[rid] == 2 * n for rid, n in rows.items())
