"""SIGKILL the app server at random moments while runs are in flight.

Every run must end completed, and no step whose result was recorded may run
again.  Recovery comes only from leases expiring and scheduler ticks.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg

from tests.apps import crashy as crash_app
from tests.helpers import KEY, make_fk

from .conftest import AppServer

RUNS = 150
KILLS = 6


async def test_app_server_killed_repeatedly_loses_nothing(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    await conn.execute(crash_app.SCHEMA_SQL)
    fk = make_fk(database_url, dispatch_lease=1.5)
    fk.register(crash_app.crashy_workflow)
    server = app_server(
        "tests.apps.crash_app",
        fk.test_port,  # type: ignore[attr-defined]
        {
            "DATABASE_URL": database_url,
            "FLOWKEEPER_SIGNING_KEY": KEY,
            "FLOWKEEPER_ENDPOINT": fk.dispatcher.endpoint,  # type: ignore[union-attr]
        },
    )
    server.start()
    rng = random.Random(20261126)
    stop_ticking = asyncio.Event()

    async def ticker() -> None:
        while not stop_ticking.is_set():
            try:
                await fk.tick()
            except Exception:  # the endpoint may be down right now
                pass
            await asyncio.sleep(0.2)

    try:
        handles = await asyncio.gather(*(fk.trigger("crashy", i) for i in range(RUNS)))
        ticking = asyncio.create_task(ticker())
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.15, 0.6))
            server.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            server.start()
        ids = [h.run_id for h in handles]
        for _ in range(600):
            done = await conn.fetchval(
                "SELECT count(*) FROM flowkeeper.runs WHERE id = ANY($1::uuid[]) "
                "AND status IN ('completed', 'failed', 'cancelled')",
                ids,
            )
            if done == RUNS:
                break
            await asyncio.sleep(0.2)
        stop_ticking.set()
        await ticking
    finally:
        server.stop()
        await fk.aclose()

    statuses = dict(
        await conn.fetch("SELECT status, count(*) FROM flowkeeper.runs GROUP BY status")
    )
    assert statuses == {"completed": RUNS}, statuses
    assert server.kills == KILLS
    # No recorded step ran again.
    rerun = await conn.fetchval("SELECT count(*) FROM fault_log WHERE recorded_before")
    assert rerun == 0
    # Every step of every run is recorded exactly once and executed at least once.
    per_run = await conn.fetch(
        "SELECT run_id, count(*) AS n FROM flowkeeper.steps WHERE kind = 'step' GROUP BY run_id"
    )
    assert len(per_run) == RUNS
    assert all(r["n"] == crash_app.STEPS for r in per_run)
    executions = await conn.fetchval("SELECT count(*) FROM fault_log")
    assert executions >= RUNS * crash_app.STEPS
    outputs = await conn.fetch("SELECT output::int FROM flowkeeper.runs ORDER BY output::int")
    assert [r[0] for r in outputs] == [i + crash_app.STEPS for i in range(RUNS)]
    print(
        f"\ncrash test: {RUNS} runs, {server.kills} SIGKILLs, {executions} step executions "
        f"({executions - RUNS * crash_app.STEPS} repeated before being recorded), "
        f"0 recorded steps re-executed"
    )
