"""Schema migrations: applied once under an advisory lock, in any schema, shaped for the queries."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg
import pytest

from flowkeeper import Context, MigrationError
from flowkeeper.migrations import current_version, latest_version, migrate
from flowkeeper.sql import load_queries

from ..helpers import make_fk, serve


async def test_first_use_creates_the_schema(empty_database_url: str) -> None:
    fk = make_fk(empty_database_url, schema="shop_flows")

    @fk.workflow("w")
    async def w(ctx: Context) -> str:
        return await ctx.step("s", lambda: "ok")

    try:
        async with serve(fk):
            handle = await fk.trigger("w")
            assert await fk.result(handle.run_id, timeout=10) == "ok"
        conn = await asyncpg.connect(empty_database_url)
        try:
            assert await current_version(conn, "shop_flows") == latest_version()
            assert await current_version(conn, "flowkeeper") == 0  # nothing in the default schema
        finally:
            await conn.close()
    finally:
        await fk.aclose()


async def test_concurrent_migrations_apply_each_version_once(empty_database_url: str) -> None:
    conns = [await asyncpg.connect(empty_database_url) for _ in range(8)]
    try:
        results = await asyncio.gather(*(migrate(c, "flowkeeper") for c in conns))
        applied = [v for r in results for v in r]
        assert sorted(applied) == list(range(1, latest_version() + 1))
        rows = await conns[0].fetch("SELECT version FROM flowkeeper.migrations ORDER BY version")
        assert [r["version"] for r in rows] == list(range(1, latest_version() + 1))
        assert await migrate(conns[0], "flowkeeper") == []  # idempotent
    finally:
        for c in conns:
            await c.close()


async def test_migrations_rebuild_the_template_schema(
    conn: asyncpg.Connection, empty_database_url: str
) -> None:
    """A fresh migrate gives the same tables, columns and indexes as the test template."""

    async def shape(c: asyncpg.Connection) -> list[tuple[str, ...]]:
        columns = await c.fetch(
            """SELECT table_name, column_name, data_type, is_nullable
               FROM information_schema.columns WHERE table_schema = 'flowkeeper'
               ORDER BY table_name, column_name"""
        )
        indexes = await c.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'flowkeeper' ORDER BY 1"
        )
        return [tuple(r) for r in columns] + [tuple(r) for r in indexes]

    fresh = await asyncpg.connect(empty_database_url)
    try:
        await migrate(fresh, "flowkeeper")
        assert await shape(fresh) == await shape(conn)
        assert len(await shape(fresh)) > 30
    finally:
        await fresh.close()


async def test_newer_schema_than_the_code_is_refused(
    database_url: str, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "INSERT INTO flowkeeper.migrations (version, name) VALUES ($1, 'from_the_future')",
        latest_version() + 1,
    )
    fk = make_fk(database_url)
    try:
        with pytest.raises(MigrationError, match="Upgrade flowkeeper"):
            await fk.get_run(str(uuid.uuid4()))
    finally:
        await fk.aclose()


async def test_auto_migrate_off_says_what_to_run(empty_database_url: str) -> None:
    fk = make_fk(empty_database_url, auto_migrate=False)
    try:
        with pytest.raises(MigrationError, match="flowkeeper migrate"):
            await fk.get_run(str(uuid.uuid4()))
    finally:
        await fk.aclose()


async def test_the_scheduler_claim_uses_the_partial_due_index(conn: asyncpg.Connection) -> None:
    # Many finished runs, a few due ones: the claim must not scan the history.
    await conn.execute(
        """INSERT INTO flowkeeper.runs (id, workflow, status, due_at)
           SELECT gen_random_uuid(), 'w', 'completed', NULL FROM generate_series(1, 20000)"""
    )
    await conn.execute(
        """INSERT INTO flowkeeper.runs (id, workflow, status, due_at)
           SELECT gen_random_uuid(), 'w', 'queued', now() FROM generate_series(1, 50)"""
    )
    await conn.execute("ANALYZE flowkeeper.runs")
    query = load_queries("flowkeeper")["claim_due"]
    rows = await conn.fetch("EXPLAIN " + query, 100, timedelta(seconds=30))
    text = "\n".join(r[0] for r in rows)
    assert "runs_due_idx" in text, text
    assert "Seq Scan" not in text, text


async def test_cli_migrate(empty_database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from flowkeeper.cli import main

    assert await asyncio.to_thread(main, ["migrate", "--database-url", empty_database_url]) == 0
    assert "applied migrations 1, 2," in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["migrate", "--database-url", empty_database_url]) == 0
    assert "up to date" in capsys.readouterr().out
