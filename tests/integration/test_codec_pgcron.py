"""pg_cron dispatch works with sealed payloads: it never reads them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from flowkeeper import Context
from flowkeeper.codec import AesGcmCodec
from flowkeeper.pgcron import PgCron

from ..helpers import KEY, make_fk, serve, wait_for
from .test_pgcron import needs_plpython

KEY1 = AesGcmCodec.generate_key()


@pytest.fixture
async def pgcron(database_url: str) -> AsyncIterator[PgCron]:
    installer = PgCron(database_url)
    try:
        yield installer
    finally:
        with contextlib.suppress(Exception):
            await installer.uninstall()


@needs_plpython
async def test_pg_cron_tick_drives_sealed_runs(
    database_url: str, conn: asyncpg.Connection, pgcron: PgCron
) -> None:
    fk = make_fk(database_url, codec=AesGcmCodec([KEY1]))

    @fk.workflow("sealed")
    async def sealed(ctx: Context, secret: str) -> str:
        return await ctx.step("echo", lambda: f"{secret}!")

    trigger_side = make_fk(database_url, endpoint=None, codec=AesGcmCodec([KEY1]))
    trigger_side.workflow("sealed")(sealed)
    try:
        ids = [(await trigger_side.trigger("sealed", f"SECRET-{i}")).run_id for i in range(5)]
        await pgcron.install(endpoint=fk.dispatcher.endpoint, signing_key=KEY, every="1m")  # type: ignore[union-attr]
        async with serve(fk):
            await conn.execute("CALL flowkeeper.pgcron_tick()")

            async def done() -> bool:
                n = await conn.fetchval(
                    "SELECT count(*) FROM flowkeeper.runs WHERE status = 'completed' "
                    "AND id = ANY($1::uuid[])",
                    ids,
                )
                return bool(n == len(ids))

            await wait_for(done, timeout=30)
        assert [await fk.result(r) for r in ids] == [f"SECRET-{i}!" for i in range(5)]
        raw = await conn.fetchval(
            "SELECT string_agg(output::text || input::text, ' ') FROM flowkeeper.runs"
        )
        assert "SECRET" not in raw
    finally:
        await fk.aclose()
        await trigger_side.aclose()
