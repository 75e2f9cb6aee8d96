"""trigger(connection=...) inside transactions of SQLAlchemy and psycopg 3, and fk.sync's.

Each kind: a committed transaction holds the run (and the app's own row), a
rolled-back one holds neither; an idempotency key taken returns the first run.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from flowkeeper import Context, FlowKeeper
from flowkeeper.errors import ConfigurationError
from flowkeeper.foreign import dbapi_query

from ..helpers import KEY


def _fk(url: str) -> FlowKeeper:
    fk = FlowKeeper(url, signing_key=KEY, endpoint="")

    @fk.workflow("noop")
    async def noop(ctx: Context, n: int) -> int:
        return n

    return fk


async def _rows(fk: FlowKeeper) -> tuple[int, int]:
    async with fk.db.acquire() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS things (n int)")
        return (
            await conn.fetchval("SELECT count(*) FROM things"),
            await conn.fetchval("SELECT count(*) FROM flowkeeper.runs"),
        )


class Boom(Exception):
    pass


async def test_sqlalchemy_async_connection_and_session(database_url: str) -> None:
    fk = _fk(database_url)
    await _rows(fk)
    engine = create_async_engine(database_url.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        with pytest.raises(Boom):  # noqa: PT012 (the rollback is the point)
            async with engine.begin() as conn:
                # The trigger comes first: SQLAlchemy's transaction must begin for it.
                await fk.trigger("noop", 1, connection=conn)
                await conn.execute(text("INSERT INTO things VALUES (1)"))
                raise Boom
        assert await _rows(fk) == (0, 0)
        async with engine.begin() as conn:
            handle = await fk.trigger("noop", 2, connection=conn, idempotency_key="k")
            await conn.execute(text("INSERT INTO things VALUES (2)"))
        assert handle.created and await _rows(fk) == (1, 1)
        async with AsyncSession(engine) as session, session.begin():
            again = await fk.trigger("noop", 2, connection=session, idempotency_key="k")
            other = await fk.trigger("noop", 3, connection=session)
        assert again.run_id == handle.run_id and not again.created
        assert other.created and await _rows(fk) == (1, 2)
        assert (await fk.get_run(other.run_id)).status == "queued"
    finally:
        await engine.dispose()
        await fk.aclose()


async def test_psycopg_async_connection(database_url: str) -> None:
    fk = _fk(database_url)
    await _rows(fk)
    try:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            with pytest.raises(Boom):  # noqa: PT012 (the rollback is the point)
                async with conn.transaction():
                    await fk.trigger("noop", 1, connection=conn)
                    await conn.execute("INSERT INTO things VALUES (1)")
                    raise Boom
            assert await _rows(fk) == (0, 0)
            async with conn.transaction():
                handle = await fk.trigger("noop", 5, connection=conn, idempotency_key="k%1")
                await conn.execute("INSERT INTO things VALUES (5)")
            again = await fk.trigger("noop", 5, connection=conn, idempotency_key="k%1")
        assert handle.created and not again.created and again.run_id == handle.run_id
        info = await fk.get_run(handle.run_id)
        assert info.status == "queued" and info.input == 5 and info.idempotency_key == "k%1"
        assert await _rows(fk) == (1, 1)
    finally:
        await fk.aclose()


def test_sync_psycopg_connection_through_fk_sync(database_url: str) -> None:
    fk = _fk(database_url)

    async def prepare() -> None:
        await _rows(fk)
        await fk.aclose()

    asyncio.run(prepare())
    try:
        with psycopg.connect(database_url) as conn:
            with pytest.raises(Boom), conn.transaction():  # noqa: PT012
                fk.sync.trigger("noop", 1, connection=conn)
                raise Boom
            with conn.transaction():
                handle = fk.sync.trigger("noop", 7, connection=conn)
        assert fk.sync.get_run(handle.run_id).input == 7
        assert fk.sync.cancel(handle.run_id) is True
        assert fk.sync.get_run(handle.run_id).status == "cancelled"
    finally:
        fk.sync.close()


async def test_a_sync_connection_in_async_trigger_is_refused_clearly(database_url: str) -> None:
    fk = _fk(database_url)
    try:
        conn = await asyncio.to_thread(psycopg.connect, database_url)
        try:
            with pytest.raises(ConfigurationError, match=r"fk\.sync\.trigger"):
                await fk.trigger("noop", 1, connection=conn)
        finally:
            conn.close()
        with pytest.raises(ConfigurationError, match="connection= takes"):
            await fk.trigger("noop", 1, connection=object())
    finally:
        await fk.aclose()


@pytest.mark.parametrize(
    ("sql", "args", "expected"),
    [
        ("SELECT $2, $1 -- a $3 in a comment", ("a", "b", "c"), ("SELECT %s, %s ", ["b", "a"])),
        ("SELECT '%' || $1", (1,), ("SELECT '%%' || %s", [1])),
        ("SELECT $1, $1", (uuid.UUID(int=0),), ("SELECT %s, %s", [uuid.UUID(int=0)] * 2)),
    ],
)
def test_dbapi_query_rewrites_placeholders(sql: str, args: Any, expected: Any) -> None:
    assert dbapi_query(sql, args) == expected
