"""SIGKILL the app server at random moments while runs are in flight.

Runs are triggered in waves, some while the server is down (their push fails
and they wait for the scheduler).  Every run must end completed, and no step
whose result was recorded may run again.  Recovery comes only from leases
expiring and scheduler ticks.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg

from tests.apps import crashy
from tests.helpers import KEY, make_fk

from .conftest import AppServer
from .workload import check_runs, ticking, wait_finished

WAVES = 20
RUNS_PER_WAVE = 8


async def test_app_server_killed_repeatedly_loses_nothing(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    await conn.execute(crashy.SCHEMA_SQL)
    fk = make_fk(database_url, dispatch_lease=1.5, ack_timeout=2)
    fk.register(crashy.crashy_workflow)
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
    ids: list[str] = []
    try:
        async with ticking(fk):
            for wave in range(WAVES):
                handles = await asyncio.gather(
                    *(fk.trigger("crashy", wave * RUNS_PER_WAVE + i) for i in range(RUNS_PER_WAVE))
                )
                ids += [h.run_id for h in handles]
                await asyncio.sleep(rng.uniform(0.05, 0.4))  # somewhere inside some steps
                server.kill()
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                server.start()
            await wait_finished(database_url, ids)
    finally:
        server.stop()
        await fk.aclose()

    checked = await check_runs(conn, ids, kills_injected=server.kills)
    assert server.kills == WAVES
    print(
        f"\napp crash: {checked.runs} runs, {server.kills} SIGKILLs, {checked.executions} step "
        f"executions ({checked.repeated_before_recording} repeated before being recorded), "
        "0 recorded steps re-executed"
    )
