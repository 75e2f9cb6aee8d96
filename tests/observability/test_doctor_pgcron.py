"""``flowkeeper doctor`` with pg_cron: its key, and the endpoint as seen from the database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from flowkeeper import Context
from flowkeeper.cli import main
from flowkeeper.pgcron import PgCron

from ..helpers import KEY, make_fk, serve
from ..integration.test_pgcron import needs_pg_cron, needs_plpython
from .test_health import line


@pytest.fixture
async def pgcron(database_url: str) -> AsyncIterator[PgCron]:
    installer = PgCron(database_url)
    try:
        yield installer
    finally:
        with contextlib.suppress(Exception):
            await installer.uninstall()


@needs_pg_cron
@needs_plpython
async def test_doctor_checks_pg_cron_key_and_reach(
    database_url: str,
    conn: asyncpg.Connection,
    pgcron: PgCron,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("FLOWKEEPER_SIGNING_KEY", "FLOWKEEPER_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    fk = make_fk(database_url)
    endpoint = fk.dispatcher.endpoint  # type: ignore[union-attr]
    late = make_fk(database_url, endpoint=None)

    @late.workflow("noop")
    async def noop(ctx: Context) -> int:
        return 1

    fk.workflow("noop")(noop)

    async def doctor() -> str:
        argv = ["doctor", "--database-url", database_url, "--signing-key", KEY]
        await asyncio.to_thread(main, [*argv, "--endpoint", endpoint])
        return capsys.readouterr().out

    try:
        await late.trigger("noop")
        await pgcron.install(
            endpoint=endpoint, signing_key="another-signing-key-0123456789abcdef", every="1m"
        )
        async with serve(fk):
            out = await doctor()
        check = line(out, "pg_cron key")
        assert "FAIL  pg_cron key       pg_cron signs its invocations with another key" in check
        assert "fix: run `flowkeeper pgcron install` again" in check

        # The right key, but the endpoint is down when the job ticks (from the database).
        await pgcron.install(endpoint=endpoint, signing_key=KEY, every="1m")
        await conn.execute("UPDATE flowkeeper.runs SET due_at = now()")
        await conn.execute("CALL flowkeeper.pgcron_tick()")
        async with serve(fk):
            out = await doctor()
        assert "pg_cron key" not in out
        reach = line(out, "pg_cron reach")
        assert reach.startswith(
            f"FAIL  pg_cron reach     from the database, pg_cron's last tick could not reach "
            f"{endpoint}"
        )
        assert "fix: the endpoint must be reachable from the database server" in reach
        assert line(out, "driver").startswith("ok    driver            last tick ")
        assert "by pgcron at flowkeeper:" in line(out, "driver")
    finally:
        await late.aclose()
        await fk.aclose()
