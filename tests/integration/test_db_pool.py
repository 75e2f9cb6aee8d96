"""flowkeeper's connection pool (flowkeeper.db.Database) against a real server."""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings

import asyncpg
import pytest

from flowkeeper.db import Database
from flowkeeper.errors import DatabaseError
from flowkeeper.store import Store


async def _backends(conn: asyncpg.Connection, application_name: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            application_name,
        )
    )


def _url(database_url: str, name: str) -> str:
    sep = "&" if "?" in database_url else "?"
    return f"{database_url}{sep}application_name={name}"


async def test_never_more_than_max_size_connections(
    database_url: str, conn: asyncpg.Connection
) -> None:
    db = Database(_url(database_url, "fk_pool_max"), max_size=3)
    store = Store(db, "flowkeeper")
    await store.migrate()
    peak = 0

    async def one() -> None:
        nonlocal peak
        async with db.acquire() as c:
            await c.execute("SELECT pg_sleep(0.02)")
            peak = max(peak, await _backends(c, "fk_pool_max"))

    await asyncio.gather(*(one() for _ in range(40)))
    assert 1 <= peak <= 3
    assert await _backends(conn, "fk_pool_max") <= 3
    await db.close()
    await asyncio.sleep(0.1)
    assert await _backends(conn, "fk_pool_max") == 0


async def test_a_connection_is_reused_and_a_refused_statement_keeps_it(
    database_url: str,
) -> None:
    db = Database(database_url, max_size=2)
    try:
        async with db.acquire() as c:
            first = await c.fetchval("SELECT pg_backend_pid()")
        with pytest.raises(asyncpg.UndefinedTableError):
            async with db.acquire() as c:
                await c.execute("SELECT * FROM no_such_table")
        async with db.acquire() as c:
            assert await c.fetchval("SELECT pg_backend_pid()") == first
    finally:
        await db.close()


async def test_a_cancelled_query_closes_its_connection_and_frees_its_slot(
    database_url: str, conn: asyncpg.Connection
) -> None:
    db = Database(_url(database_url, "fk_pool_cancel"), max_size=1)
    store = Store(db, "flowkeeper")
    await store.migrate()
    try:
        async with db.acquire() as c:
            first = await c.fetchval("SELECT pg_backend_pid()")

        async def slow() -> None:
            async with db.acquire() as c:
                await c.execute("SELECT pg_sleep(30)")

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The only slot is free again, and it serves on a new session: the
        # cancelled one may still be inside pg_sleep and is not reused.
        async with asyncio.timeout(5):
            async with db.acquire() as c:
                assert await c.fetchval("SELECT pg_backend_pid()") != first
    finally:
        await db.close()


async def test_idle_connections_are_closed_after_max_idle(
    database_url: str, conn: asyncpg.Connection
) -> None:
    db = Database(_url(database_url, "fk_pool_idle"), max_size=4, max_idle=0.3)
    try:

        async def one() -> None:
            async with db.acquire() as c:
                await c.execute("SELECT pg_sleep(0.05)")

        await asyncio.gather(*(one() for _ in range(4)))
        assert await _backends(conn, "fk_pool_idle") == 4
        for _ in range(40):
            await asyncio.sleep(0.1)
            if await _backends(conn, "fk_pool_idle") == 0:
                break
        assert await _backends(conn, "fk_pool_idle") == 0
        async with db.acquire() as c:  # and the pool still serves
            assert await c.fetchval("SELECT 1") == 1
    finally:
        await db.close()


async def test_a_lost_server_connection_is_discarded(
    database_url: str, conn: asyncpg.Connection
) -> None:
    db = Database(_url(database_url, "fk_pool_lost"), max_size=1)
    store = Store(db, "flowkeeper")
    await store.migrate()
    try:
        async with db.acquire() as c:
            pid = await c.fetchval("SELECT pg_backend_pid()")
        await conn.execute("SELECT pg_terminate_backend($1)", pid)
        await asyncio.sleep(0.2)
        # The next query either finds the connection closed and opens another,
        # or fails once with a DatabaseError; the one after that works.
        try:
            await store.clock_now()
        except DatabaseError:
            pass
        await store.clock_now()
        async with db.acquire() as c:
            assert await c.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await db.close()


async def test_a_connection_given_back_after_close_is_closed_not_pooled(
    database_url: str,
) -> None:
    db = Database(database_url, max_size=1)
    early = await db.get()
    await db.close()  # e.g. aclose() while an invocation was still querying
    current = await db.get()  # the pool is made again on next use
    db.put(early)
    assert early.is_closed()
    # Giving back the old connection did not add a second slot to a pool of one.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await db.get()
    db.put(current)
    async with db.acquire() as c:
        assert c is current
    await db.close()


def test_each_event_loop_gets_its_own_connections(database_url: str) -> None:
    # Serverless hosts may run each invocation in a new event loop.
    db = Database(database_url, max_size=2)
    pids: list[int] = []

    async def use(close: bool) -> None:
        async with db.acquire() as c:
            pids.append(await c.fetchval("SELECT pg_backend_pid()"))
        if close:
            await db.close()

    def in_new_loop(close: bool) -> None:  # a fresh thread and loop, as such hosts do
        thread = threading.Thread(target=asyncio.run, args=(use(close),))
        thread.start()
        thread.join()

    # Closed at the end of each loop (what the adapters do): reopened in the next.
    in_new_loop(True)
    in_new_loop(True)
    assert len(pids) == 2 and pids[0] != pids[1]
    # Left open when its loop ended: the next loop drops those connections
    # (their loop is gone, so their sockets close when collected) and opens its own.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        in_new_loop(False)
        in_new_loop(True)
        gc.collect()
    assert len(pids) == 4 and pids[2] != pids[3]
