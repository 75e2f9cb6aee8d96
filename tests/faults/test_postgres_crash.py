"""SIGKILL PostgreSQL itself mid-load, restart it with crash recovery, repeat.

The cluster is a private, durable one (fsync and synchronous_commit on), so
other tests' databases are not disturbed and a commit acknowledged before a
crash must survive it.  The app server, the ticker and the step bodies all
lose their connections at each kill; every run must still end completed,
with no recorded step run again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import asyncpg
import pytest

from flowkeeper import FlowKeeper
from flowkeeper.errors import FlowKeeperError
from flowkeeper.testing import PostgresCluster
from tests.apps import crashy
from tests.helpers import KEY, make_fk

from .conftest import AppServer
from .workload import check_runs, ticking, wait_finished

KILLS = 4
RUNS_PER_WAVE = 15


@pytest.fixture
def durable_pg() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(durable=True)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def restart(cluster: PostgresCluster) -> None:
    # Backends of the killed postmaster may hold its shared memory for a moment.
    deadline = time.monotonic() + 30
    while True:
        try:
            cluster.restart()
            return
        except FlowKeeperError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.slow
async def test_postgres_killed_mid_load_loses_nothing(
    durable_pg: PostgresCluster, app_server: type[AppServer]
) -> None:
    url = durable_pg.url
    setup = FlowKeeper(url, KEY)
    await setup.migrate()
    await setup.aclose()
    conn = await asyncpg.connect(url)
    await conn.execute(crashy.SCHEMA_SQL)
    await conn.close()

    fk = make_fk(url, dispatch_lease=1.5, ack_timeout=2)
    fk.register(crashy.crashy_workflow)
    server = app_server(
        "tests.apps.crash_app",
        fk.test_port,  # type: ignore[attr-defined]
        {
            "DATABASE_URL": url,
            "FLOWKEEPER_SIGNING_KEY": KEY,
            "FLOWKEEPER_ENDPOINT": fk.dispatcher.endpoint,  # type: ignore[union-attr]
        },
    )
    server.start()
    rng = random.Random(4242)
    ids: list[str] = []
    kills = 0
    try:
        async with ticking(fk):
            for wave in range(KILLS):
                handles = await asyncio.gather(
                    *(fk.trigger("crashy", wave * RUNS_PER_WAVE + i) for i in range(RUNS_PER_WAVE))
                )
                ids += [h.run_id for h in handles]
                await asyncio.sleep(rng.uniform(0.05, 0.3))  # inside some steps' writes
                await asyncio.to_thread(durable_pg.kill)
                kills += 1
                await asyncio.sleep(rng.uniform(0.2, 0.8))
                await asyncio.to_thread(restart, durable_pg)
            await wait_finished(url, ids)
    finally:
        server.stop()
        await fk.aclose()

    conn = await asyncpg.connect(url)
    try:
        checked = await check_runs(conn, ids, kills_injected=kills)
    finally:
        await conn.close()
    print(
        f"\npostgres crash: {checked.runs} runs, {kills} PostgreSQL SIGKILLs, "
        f"{checked.executions} step executions "
        f"({checked.repeated_before_recording} repeated before being recorded)"
    )
