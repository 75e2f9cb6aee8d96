"""A step rate limit holds with several drivers at once and the app SIGKILLed twice.

Every call a rate-limited step makes is logged on the database clock, the
calls of bodies cut by a kill included.  No one-second window holds more
calls than the limit allows (10 % allowance for a start dispatched a little
late), every run completes with its result, and no ticket is left behind:
a start time taken by an invocation that died is lost, never doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import asyncpg

from flowkeeper.scheduler import SchedulerLoop
from tests.apps import steprate
from tests.helpers import KEY, make_fk

from .conftest import AppServer
from .workload import ticking, wait_finished

RUNS = int(os.environ.get("STEPRATE_FAULT_RUNS", "160"))


async def test_a_step_rate_limit_holds_through_kills_and_many_drivers(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    await conn.execute(steprate.SCHEMA_SQL)
    fk = make_fk(database_url, dispatch_lease=1.5, ack_timeout=2, rate_limits=steprate.LIMITS)
    fk.register(steprate.workflow)
    env = {
        "DATABASE_URL": database_url,
        "FLOWKEEPER_SIGNING_KEY": KEY,
        "FLOWKEEPER_ENDPOINT": fk.dispatcher.endpoint,  # type: ignore[union-attr]
        "STEPRATE_LIMIT": str(steprate.RATE),
        "FAULT_LEASE": "3",
    }
    server = app_server("tests.apps.steprate_app", fk.test_port, env)  # type: ignore[attr-defined]
    server.start()
    other = make_fk(database_url, port=fk.test_port, dispatch_lease=1.5, ack_timeout=2)  # type: ignore[attr-defined]
    loop = SchedulerLoop(other, max_idle=1.0, poll_interval=0.5)
    task = asyncio.create_task(loop.run())
    ids: list[str] = []
    t0 = time.monotonic()
    try:
        async with ticking(fk, interval=0.3):
            for wave in range(4):
                handles = await asyncio.gather(
                    *(fk.trigger("throttled-call", wave * 1000 + i) for i in range(RUNS // 4))
                )
                ids += [h.run_id for h in handles]
                if wave in (1, 2):
                    await asyncio.sleep(0.5)  # calls in flight, others waiting for their time
                    server.kill()
                    await asyncio.sleep(0.3)
                    server.start()
            await wait_finished(database_url, ids, timeout=180)
    finally:
        loop.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
        server.stop()
        await other.aclose()
        await fk.aclose()
    took = time.monotonic() - t0

    statuses = await conn.fetch(
        "SELECT status, count(*) AS n FROM flowkeeper.runs GROUP BY status ORDER BY status"
    )
    assert {r["status"]: r["n"] for r in statuses} == {"completed": RUNS}
    outputs = await conn.fetch("SELECT input::text AS i, output::text AS o FROM flowkeeper.runs")
    assert all(int(r["o"]) == int(r["i"]) * 3 for r in outputs)
    calls = [
        r["started"].timestamp()
        for r in await conn.fetch("SELECT started FROM steprate_log ORDER BY started")
    ]
    assert len(calls) >= RUNS  # every run's call, and those cut by a kill
    allowed = int(steprate.RATE * 1.1) + 1
    windows = [sum(1 for u in calls[i:] if u < t + 1.0) for i, t in enumerate(calls)]
    assert max(windows) <= allowed, max(windows)
    rate = (len(calls) - 1) / (calls[-1] - calls[0])
    assert rate <= steprate.RATE * 1.1, rate
    assert server.kills == 2
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.step_tickets") == 0
    print(
        f"\nstep rate limit {steprate.RATE}/s: {RUNS} runs, {len(calls)} calls "
        f"({len(calls) - RUNS} cut by {server.kills} SIGKILLs) in {took:.1f}s, "
        f"{rate:.1f} calls/s, busiest second {max(windows)}"
    )
