"""Driver health and ``flowkeeper doctor``, against each broken configuration."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest

from flowkeeper import Context, FlowKeeper
from flowkeeper.cli import main
from flowkeeper.dashboard.routes import Dashboard
from flowkeeper.testing.postgres import free_port

from ..helpers import KEY, drive, make_fk, serve


async def doctor(
    capsys: pytest.CaptureFixture[str], database_url: str, endpoint: str | None, key: str = KEY
) -> tuple[int, str]:
    argv = ["doctor", "--database-url", database_url, "--signing-key", key]
    if endpoint:
        argv += ["--endpoint", endpoint]
    code = await asyncio.to_thread(main, argv)
    out, _ = capsys.readouterr()
    return code, out


def line(out: str, name: str) -> str:
    """The check's line and its fix line."""
    lines = out.splitlines()
    for i, text in enumerate(lines):
        if text[6:].startswith(name + " "):
            fix = lines[i + 1] if i + 1 < len(lines) and "fix:" in lines[i + 1] else ""
            return text + "\n" + fix
    raise AssertionError(f"no {name!r} check in:\n{out}")


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLOWKEEPER_SIGNING_KEY", "FLOWKEEPER_ENDPOINT", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


async def test_doctor_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"postgresql://nobody:pw@127.0.0.1:{free_port()}/nowhere"
    code, out = await doctor(capsys, url, None)
    assert code == 1
    assert line(out, "database").startswith("FAIL  database          cannot reach the database")
    assert "fix: check DATABASE_URL" in line(out, "database")
    assert "schema" not in out  # nothing after the first broken link


async def test_doctor_unmigrated_schema(
    empty_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = await doctor(capsys, empty_database_url, None)
    assert code == 1
    assert line(out, "database").startswith("ok    database          reachable")
    schema = line(out, "schema")
    assert "FAIL  schema            schema 'flowkeeper' is at version 0, this flowkeeper needs" in (
        schema
    )
    assert "(not created yet)" in schema and "fix: run `flowkeeper migrate`" in schema
    conn = await asyncpg.connect(empty_database_url)
    try:  # doctor changed nothing
        assert await conn.fetchval("SELECT to_regclass('flowkeeper.runs')") is None
    finally:
        await conn.close()


async def test_doctor_unreachable_endpoint_and_no_driver(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}/api/flowkeeper"
    code, out = await doctor(capsys, database_url, endpoint)
    assert code == 1
    assert line(out, "schema").startswith("ok    schema")
    check = line(out, "endpoint")
    assert check.startswith(f"FAIL  endpoint          {endpoint} is unreachable from here: ")
    assert "fix: is the app running and is FLOWKEEPER_ENDPOINT its public URL" in check
    driver = line(out, "driver")
    assert driver.startswith("FAIL  driver            no driver has ever ticked")
    assert "fix: is a driver running? start one: `flowkeeper scheduler`" in driver
    assert line(out, "backlog").startswith("ok    backlog           0 run(s) due now, none overdue")


async def test_doctor_wrong_signing_key(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fk = make_fk(database_url)
    try:
        async with serve(fk):
            other = "another-signing-key-0123456789abcdef"
            code, out = await doctor(capsys, database_url, fk.dispatcher.endpoint, other)  # type: ignore[union-attr]
    finally:
        await fk.aclose()
    assert code == 1
    check = line(out, "signing key")
    assert check.startswith("FAIL  signing key       ")
    assert "refused the signed probe" in check
    assert "fix: the endpoint's FLOWKEEPER_SIGNING_KEY differs from the one used here" in check


async def test_doctor_stale_driver_and_overdue_runs_then_all_well(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fk = make_fk(database_url)

    @fk.workflow("noop")
    async def noop(ctx: Context) -> int:
        return 1

    try:
        async with serve(fk):
            endpoint = fk.dispatcher.endpoint  # type: ignore[union-attr]
            await fk.tick()  # a driver ticks ("python": fk.tick from the app)
            conn = await asyncpg.connect(database_url)
            try:
                await conn.execute(
                    "UPDATE flowkeeper.driver_ticks SET last_at = now() - interval '14 minutes'"
                )
                late = make_fk(database_url, endpoint=None)  # inserted here, due for a driver
                late.workflow("noop")(noop)
                try:
                    ids = [(await late.trigger("noop")).run_id for _ in range(37)]
                finally:
                    await late.aclose()
                await conn.execute(
                    "UPDATE flowkeeper.runs SET due_at = now() - interval '10 minutes'"
                )
                code, out = await doctor(capsys, database_url, endpoint)
                assert code == 1
                assert line(out, "endpoint").startswith("ok    endpoint")
                driver = line(out, "driver")
                assert driver.startswith("FAIL  driver            last tick 14 min ago by python")
                backlog = line(out, "backlog")
                assert "37 run(s) overdue" in backlog
                assert "no driver has ticked for 14 min; 37 runs overdue" in backlog
                # The dashboard's banner says the same.
                data = await Dashboard(fk)._runs_data(_request())
                assert data["health"]["problems"][0].startswith(
                    "no driver has ticked for 14 min; 37 runs overdue. Is a driver running?"
                )
                run = await Dashboard(fk)._run_data(ids[0])
                assert run["overdue"].startswith("overdue: due 10 min ago and not dispatched.")
                # The CLI says it of the run too.
                code = await asyncio.to_thread(
                    main, ["runs", "show", ids[0], "--database-url", database_url]
                )
                shown = capsys.readouterr().out
                assert "overdue: due 10 min ago and not dispatched. Is a driver running?" in shown
                # A driver catches up: all well again.
                await drive(fk, ids)
                code, out = await doctor(capsys, database_url, endpoint)
                assert code == 0, out
                assert out.rstrip().endswith("all checks passed")
                data = await Dashboard(fk)._runs_data(_request())
                assert data["health"]["problems"] == []
            finally:
                await conn.close()
    finally:
        await fk.aclose()


async def test_every_driver_records_its_kind(database_url: str) -> None:
    fk = make_fk(database_url, cron_secret="cron-secret-0123456789")
    try:
        async with serve(fk):
            await fk.tick()
            async with httpx.AsyncClient() as client:
                answer = await client.get(
                    fk.dispatcher.endpoint + "/tick",  # type: ignore[union-attr]
                    headers={"authorization": "Bearer cron-secret-0123456789"},
                )
                assert answer.status_code == 200
            code = await asyncio.to_thread(
                main,
                ["tick", "--database-url", database_url, "--signing-key", KEY,
                 "--endpoint", fk.dispatcher.endpoint],  # type: ignore[union-attr]
            )  # fmt: skip
            assert code == 0
        state = await fk.health()
    finally:
        await fk.aclose()
    kinds = {d.kind: d for d in state.drivers}
    assert set(kinds) == {"python", "http", "cli"}
    assert kinds["http"].place.endswith("via /api/flowkeeper/tick")
    assert all(d.age < 60 for d in state.drivers)
    assert state.ok


def _request() -> object:
    from starlette.requests import Request

    return Request({"type": "http", "query_string": b"", "headers": [], "method": "GET"})


async def test_the_fk_fixture_is_unused(fk: FlowKeeper) -> None:
    assert (await fk.health()).problems[0].startswith("no driver has ever ticked")
