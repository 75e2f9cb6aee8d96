"""fk.fork: a new run from another's history before a step; the original untouched."""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg
import httpx
import pytest

from flowkeeper import Context, FlowKeeper, NonRetriableError, RunNotFoundError, RunStateError
from flowkeeper.cli import main

from ..helpers import drive, make_fk, serve, wait_for

PASSWORD = "correct horse battery staple"


def _pipeline(fk: FlowKeeper, calls: Counter[str], broken: set[str]) -> None:
    def body(name: str) -> str:
        calls[name] += 1
        if name in broken:
            raise NonRetriableError(f"{name} is broken")
        return f"{name}-{calls[name]}"

    @fk.workflow("pipe")
    async def pipe(ctx: Context, n: int) -> list[object]:
        out: list[object] = [ctx.patched("v2")]
        out += [await ctx.step(s, body, s) for s in ("a", "b", "c")]
        return [*out, n]


async def _snapshot(conn: asyncpg.Connection, run_id: str) -> list[object]:
    run = await conn.fetchrow(
        "SELECT status, output::text, error::text, updated_at FROM flowkeeper.runs WHERE id = $1",
        run_id,
    )
    steps = await conn.fetch(
        "SELECT key, status, output::text, attempts FROM flowkeeper.steps WHERE run_id = $1 "
        "ORDER BY position, key",
        run_id,
    )
    events = await conn.fetchval("SELECT count(*) FROM flowkeeper.events WHERE run_id = $1", run_id)
    return [tuple(run), [tuple(s) for s in steps], events]


async def test_fork_a_completed_run_from_a_step(fk: FlowKeeper, conn: asyncpg.Connection) -> None:
    calls: Counter[str] = Counter()
    _pipeline(fk, calls, set())
    async with serve(fk):
        original = (await fk.trigger("pipe", 7)).run_id
        await drive(fk, [original])
        before = await _snapshot(conn, original)
        fork = await fk.fork(original, from_step="b", reason="audit", actor="test")
        assert fork.run_id != original and fork.created
        assert await fork.result(timeout=10) == [True, "a-1", "b-2", "c-2", 7]
    assert calls == {"a": 1, "b": 2, "c": 2}  # a was copied, not run again
    assert await _snapshot(conn, original) == before  # the original is untouched
    info = await fk.get_run(fork.run_id)
    [event] = [e for e in info.events if e.kind == "forked"]
    assert event.detail is not None
    assert (event.detail["from_run"], event.detail["from_step"]) == (original, "b")
    assert info.input == 7
    keys = [s.key for s in info.steps]
    assert keys[0] == "#patch:v2" and keys[1:] == ["a", "b", "c"]


async def test_fork_a_failed_run_from_its_failed_step(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    calls: Counter[str] = Counter()
    broken = {"b"}
    _pipeline(fk, calls, broken)
    async with serve(fk):
        original = (await fk.trigger("pipe", 1)).run_id
        assert (await drive(fk, [original]))[original] == "failed"
        broken.clear()
        fork = await fk.fork(original)
        assert await fork.result(timeout=10) == [True, "a-1", "b-2", "c-1", 1]
    assert (await fk.get_run(original)).status.value == "failed"


async def test_bad_forks_are_refused_and_create_nothing(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    @fk.workflow("sleepy")
    async def sleepy(ctx: Context) -> None:
        await ctx.step("first", lambda: 1)
        await ctx.sleep("nap", 3600)

    calls: Counter[str] = Counter()
    _pipeline(fk, calls, set())
    async with serve(fk):
        live = (await fk.trigger("sleepy")).run_id
        done = (await fk.trigger("pipe", 2)).run_id
        await drive(fk, [done])

        async def sleeping() -> bool:
            return (await fk.get_run(live)).status.value == "sleeping"

        await wait_for(sleeping)
        runs = await conn.fetchval("SELECT count(*) FROM flowkeeper.runs")
        with pytest.raises(RunStateError, match="say which step"):
            await fk.fork(live)
        with pytest.raises(RunStateError, match="say which step"):
            await fk.fork(done)
        with pytest.raises(RunStateError, match="no recorded step 'nope'"):
            await fk.fork(done, from_step="nope")
        with pytest.raises(RunNotFoundError):
            await fk.fork("01931f2a-0000-7000-8000-000000000000")
        assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == runs
        # A live run forks from a recorded step: its history before it is final.
        fork = await fk.fork(live, from_step="nap")
        await wait_for(lambda: _is(fk, fork.run_id, "sleeping"))
        assert (await fk.get_run(live)).status.value == "sleeping"


async def _is(fk: FlowKeeper, run_id: str, status: str) -> bool:
    return (await fk.get_run(run_id)).status.value == status


async def test_fork_from_the_cli_and_the_dashboard(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOWKEEPER_SIGNING_KEY", raising=False)
    monkeypatch.delenv("FLOWKEEPER_ENDPOINT", raising=False)
    fk = make_fk(database_url, dashboard_password=PASSWORD)
    calls: Counter[str] = Counter()
    _pipeline(fk, calls, set())
    try:
        async with serve(fk):
            original = (await fk.trigger("pipe", 3)).run_id
            await drive(fk, [original])
            code = await asyncio.to_thread(
                main,
                ["runs", "fork", original, "--from-step", "c", "--yes",
                 "--database-url", database_url],
            )  # fmt: skip
            out = capsys.readouterr().out
            assert code == 0 and f"forked from run {original}" in out
            cli_fork = out.split()[1]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{fk.test_port}") as client:  # type: ignore[attr-defined]
                await client.post(
                    "/api/flowkeeper/ui/login",
                    data={"password": PASSWORD, "next": "/api/flowkeeper/ui/"},
                )
                page = await client.get(f"/api/flowkeeper/ui/runs/{original}")
                csrf = page.text.split('name="fk-csrf" content="', 1)[1].split('"', 1)[0]
                answer = await client.post(
                    f"/api/flowkeeper/ui/api/runs/{original}/fork",
                    json={"from_step": "b"},
                    headers={"X-CSRF-Token": csrf},
                )
            assert answer.status_code == 200, answer.text
            ui_fork = answer.json()["run_id"]
            await drive(fk, [cli_fork, ui_fork])
            cli_out, ui_out = await fk.result(cli_fork), await fk.result(ui_fork)
            # Both forks run c once more; which of them runs it first is up to the drivers.
            assert cli_out[:3] == [True, "a-1", "b-1"] and cli_out[4] == 3
            assert ui_out[:3] == [True, "a-1", "b-2"] and ui_out[4] == 3
            assert {cli_out[3], ui_out[3]} == {"c-2", "c-3"}
    finally:
        await fk.aclose()
