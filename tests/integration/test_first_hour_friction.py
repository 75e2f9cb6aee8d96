"""Friction a new user met in the first hour, each pinned by a test."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from flowkeeper import Context, FlowKeeper
from flowkeeper.errors import DatabaseError
from flowkeeper.testing.postgres import free_port

from ..helpers import KEY, make_fk, serve


def _register(fk: FlowKeeper) -> None:
    @fk.workflow("echo")
    async def echo(ctx: Context, n: int) -> int:
        return n


async def test_a_wrong_database_url_is_told_at_the_first_trigger(database_url: str) -> None:
    """The endpoint (right database) would take the run; the caller's own URL is wrong."""
    server = make_fk(database_url)
    _register(server)
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    caller = FlowKeeper(dead, signing_key=KEY, endpoint=server.dispatcher.endpoint)  # type: ignore[union-attr]
    _register(caller)
    try:
        async with serve(server):
            with pytest.raises(DatabaseError, match="check DATABASE_URL") as err:
                await caller.trigger("echo", 1)
            assert "127.0.0.1" in str(err.value) and "nowhere" in str(err.value)
            conn = await asyncpg.connect(database_url)
            try:
                assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == 0
            finally:
                await conn.close()
            # The right URL: the same call works, and the check is not repeated.
            good = make_fk(database_url, port=server.test_port)  # type: ignore[attr-defined]
            _register(good)
            handle = await good.trigger("echo", 2)
            assert await good.result(handle.run_id, timeout=20) == 2
            await good.aclose()
    finally:
        await caller.aclose()
        await server.aclose()


@pytest.mark.parametrize("pushed", [True, False])
async def test_idempotency_key_reused_with_another_input_warns_and_returns_the_first(
    database_url: str, caplog: pytest.LogCaptureFixture, pushed: bool
) -> None:
    fk = make_fk(database_url) if pushed else FlowKeeper(database_url, signing_key=KEY)
    _register(fk)
    try:
        if pushed:
            async with serve(fk):
                first = await fk.trigger("echo", 1, idempotency_key="order-1")
                with caplog.at_level(logging.WARNING, logger="flowkeeper"):
                    again = await fk.trigger("echo", 2, idempotency_key="order-1")
                same = await fk.trigger("echo", 1, idempotency_key="order-1")
        else:
            first = await fk.trigger("echo", 1, idempotency_key="order-1")
            with caplog.at_level(logging.WARNING, logger="flowkeeper"):
                again = await fk.trigger("echo", 2, idempotency_key="order-1")
            same = await fk.trigger("echo", 1, idempotency_key="order-1")
        assert first.created and not again.created and not same.created
        assert again.run_id == first.run_id == same.run_id
        assert (await fk.get_run(first.run_id)).input == 1  # the original input stands
        warnings = [r for r in caplog.records if "different input" in r.getMessage()]
        assert len(warnings) == 1, caplog.text
        assert "order-1" in warnings[0].getMessage() and first.run_id in warnings[0].getMessage()
    finally:
        await fk.aclose()


async def test_a_role_without_rights_gets_the_grants_to_run(database_url: str) -> None:
    role = f"lowly_{free_port()}"
    conn = await asyncpg.connect(database_url)
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        url = database_url.replace("postgresql://postgres@", f"postgresql://{role}@")
        fk = FlowKeeper(url, signing_key=KEY)
        _register(fk)
        try:
            with pytest.raises(DatabaseError) as err:
                await fk.trigger("echo", 1)
            text = str(err.value)
            assert f"GRANT USAGE ON SCHEMA flowkeeper TO {role}" in text
            assert "InsufficientPrivilege" not in text.split("(")[0]
            # Running the grants it names is enough.
            for grant in text.split("run: ", 1)[1].split("; or ")[0].split("; "):
                await conn.execute(grant.rstrip(";"))
            handle = await fk.trigger("echo", 2)
            assert (await fk.get_run(handle.run_id)).status == "queued"
        finally:
            await fk.aclose()
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")
        await conn.close()


async def test_scheduler_says_listening_only_once_connected_and_logs_an_outage_once() -> None:
    import asyncio
    import os
    import signal
    import sys

    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWKEEPER_")}
    env |= {
        "DATABASE_URL": dead,
        "FLOWKEEPER_SIGNING_KEY": KEY,
        "FLOWKEEPER_ENDPOINT": f"http://127.0.0.1:{free_port()}/api/flowkeeper",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from flowkeeper.cli import main; sys.exit(main())",
        "scheduler",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(4)  # several retries' worth of backoff
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out, err = stdout.decode(), stderr.decode()
    assert "listening" not in out, out
    assert err.count("cannot LISTEN") == 1, err
    assert err.count("retrying until it answers") == 1, err
