"""Rate limits hold with several drivers at once and the app SIGKILLed twice.

Every call a rate-limited step makes (and every start of a run-level limited
run) is logged on the database clock, the calls of bodies cut by a kill
included.  No one-second window holds more calls than the limit allows (10 %
allowance for a start dispatched a little late), every run completes with
its result, and no ticket is left behind: a start time taken by an
invocation that died is lost, never doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable

import asyncpg

from flowkeeper import FlowKeeper
from flowkeeper.scheduler import SchedulerLoop
from tests.apps import steprate
from tests.helpers import KEY, busiest_window, make_fk

from .conftest import AppServer
from .workload import ticking, wait_finished

RUNS = int(os.environ.get("STEPRATE_FAULT_RUNS", "160"))


async def _under_kills(
    database_url: str,
    app_server: type[AppServer],
    workflow: str,
    drivers: Callable[[str, int], contextlib.AbstractAsyncContextManager[None]] | None,
    tick_every: float,
) -> tuple[list[str], float, int]:
    """Trigger RUNS runs of ``workflow`` in four waves, SIGKILLing the app
    after the second and third; driven by pushes, ticks every ``tick_every``
    seconds and ``drivers``.  Returns the run ids, the time taken, the kills."""
    fk = make_fk(database_url, dispatch_lease=1.5, ack_timeout=2, rate_limits=steprate.LIMITS)
    fk.register(steprate.workflow)
    fk.register(steprate.run_workflow)
    env = {
        "DATABASE_URL": database_url,
        "FLOWKEEPER_SIGNING_KEY": KEY,
        "FLOWKEEPER_ENDPOINT": fk.dispatcher.endpoint,  # type: ignore[union-attr]
        "STEPRATE_LIMIT": str(steprate.RATE),
        "FAULT_LEASE": "3",
    }
    server = app_server("tests.apps.steprate_app", fk.test_port, env)  # type: ignore[attr-defined]
    server.start()
    ids: list[str] = []
    t0 = time.monotonic()
    try:
        async with contextlib.AsyncExitStack() as stack:
            if drivers is not None:  # given the database and the app's port
                await stack.enter_async_context(drivers(database_url, fk.test_port))  # type: ignore[attr-defined]
            await stack.enter_async_context(ticking(fk, interval=tick_every))
            for wave in range(4):
                handles = await asyncio.gather(
                    *(fk.trigger(workflow, wave * 1000 + i) for i in range(RUNS // 4))
                )
                ids += [h.run_id for h in handles]
                if wave in (1, 2):
                    await asyncio.sleep(0.5)  # calls in flight, others waiting for their time
                    server.kill()
                    await asyncio.sleep(0.3)
                    server.start()
            await wait_finished(database_url, ids, timeout=180)
    finally:
        server.stop()
        await fk.aclose()
    return ids, time.monotonic() - t0, server.kills


@contextlib.asynccontextmanager
async def _scheduler_loop(database_url: str, port: int) -> AsyncIterator[None]:
    other: FlowKeeper = make_fk(database_url, port=port, dispatch_lease=1.5, ack_timeout=2)
    loop = SchedulerLoop(other, max_idle=1.0, poll_interval=0.5)
    task = asyncio.create_task(loop.run())
    try:
        yield
    finally:
        loop.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
        await other.aclose()


async def _check(conn: asyncpg.Connection, calls: list[float], label: str, took: float) -> int:
    statuses = await conn.fetch(
        "SELECT status, count(*) AS n FROM flowkeeper.runs GROUP BY status ORDER BY status"
    )
    assert {r["status"]: r["n"] for r in statuses} == {"completed": RUNS}
    outputs = await conn.fetch("SELECT input::text AS i, output::text AS o FROM flowkeeper.runs")
    assert all(int(r["o"]) == int(r["i"]) * 3 for r in outputs)
    allowed = int(steprate.RATE * 1.1) + 1
    busiest = busiest_window(calls)
    assert busiest <= allowed, busiest
    rate = (len(calls) - 1) / (calls[-1] - calls[0])
    assert rate <= steprate.RATE * 1.1, rate
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.step_tickets") == 0
    print(
        f"\n{label} {steprate.RATE}/s: {RUNS} runs, {len(calls)} calls in {took:.1f}s, "
        f"{rate:.1f} calls/s, busiest second {busiest}"
    )
    return busiest


async def test_a_step_rate_limit_holds_through_kills_and_many_drivers(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    await conn.execute(steprate.SCHEMA_SQL)
    ids, took, kills = await _under_kills(
        database_url, app_server, "throttled-call", _scheduler_loop, tick_every=0.3
    )
    assert kills == 2 and len(ids) == RUNS
    calls = [
        r["started"].timestamp()
        for r in await conn.fetch("SELECT started FROM steprate_log ORDER BY started")
    ]
    assert len(calls) >= RUNS  # every run's call, and those cut by a kill
    await _check(conn, calls, "step rate limit", took)


async def test_a_run_rate_limit_holds_through_kills_under_a_coarse_driver(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    """Pushes and a tick every 2 s only (no scheduler loop): most runs are
    claimed long after their reserved start times.  A resumed run is not a
    start, so each run's first logged start is what the limit counts."""
    await conn.execute(steprate.SCHEMA_SQL)
    ids, took, kills = await _under_kills(
        database_url, app_server, "throttled-start", None, tick_every=2.0
    )
    assert kills == 2 and len(ids) == RUNS
    calls = [
        r["first"].timestamp()
        for r in await conn.fetch(
            "SELECT min(started) AS first FROM steprate_log GROUP BY run_id ORDER BY 1"
        )
    ]
    assert len(calls) == RUNS  # every run started
    await _check(conn, calls, "run rate limit, coarse driver", took)
