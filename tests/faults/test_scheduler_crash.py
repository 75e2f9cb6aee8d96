"""SIGKILL the scheduler in the middle of its ticks.

Runs are triggered without a push, so only ``flowkeeper tick`` (the CLI, a
real subprocess, as cron would start it) sends them to the endpoint.  Most
ticks are killed at a random moment: before, while or after claiming their
batch.  Runs a dead tick had claimed come back when its dispatch lease runs
out; every run must complete, none twice.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from subprocess import DEVNULL, PIPE

import asyncpg
import pytest

from tests.apps import crashy
from tests.helpers import KEY, make_fk

from .conftest import ROOT, AppServer
from .workload import check_runs

RUNS = 100
MIN_KILLS = 8
TICK = [
    sys.executable,
    "-c",
    "import sys; from flowkeeper.cli import main; sys.exit(main())",
    "tick",
    "--app",
    "tests.apps.crash_app:fk",
]


@pytest.mark.slow
async def test_scheduler_killed_mid_tick_loses_nothing(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    await conn.execute(crashy.SCHEMA_SQL)
    fk = make_fk(database_url)
    fk.register(crashy.crashy_workflow)
    endpoint = fk.dispatcher.endpoint  # type: ignore[union-attr]
    server = app_server(
        "tests.apps.crash_app",
        fk.test_port,  # type: ignore[attr-defined]
        {
            "DATABASE_URL": database_url,
            "FLOWKEEPER_SIGNING_KEY": KEY,
            "FLOWKEEPER_ENDPOINT": endpoint,
        },
    )
    server.start()
    fk.dispatcher = None  # trigger only: the ticks below do all the dispatching
    rng = random.Random(7)
    kills = ticks = 0
    try:
        handles = await asyncio.gather(*(fk.trigger("crashy", i) for i in range(RUNS)))
        ids = [h.run_id for h in handles]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            finished = await conn.fetchval(
                "SELECT count(*) FROM flowkeeper.runs WHERE status = 'completed'"
            )
            if finished == RUNS and kills >= MIN_KILLS:
                break
            tick = await asyncio.create_subprocess_exec(
                *TICK, env=server.env, cwd=ROOT, stdout=DEVNULL, stderr=PIPE
            )
            ticks += 1
            if ticks % 3 == 0:  # every third tick runs to its end
                _, err = await asyncio.wait_for(tick.communicate(), 60)
                assert tick.returncode in (0, 1), err.decode()
                continue
            await asyncio.sleep(rng.uniform(0.2, 0.9))  # interpreter start ~0.3 s, then the tick
            if tick.returncode is None:
                tick.kill()
                kills += 1
            await asyncio.wait_for(tick.communicate(), 10)
    finally:
        server.stop()
        await fk.aclose()

    checked = await check_runs(conn, ids, kills_injected=kills)
    assert kills >= MIN_KILLS, f"only {kills} of {ticks} ticks were still running when killed"
    print(
        f"\nscheduler crash: {checked.runs} runs, {ticks} ticks, {kills} killed mid-run, "
        f"{checked.executions} step executions"
    )
