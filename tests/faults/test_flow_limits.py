"""Concurrency limits hold under several drivers at once and an app SIGKILLed twice.

Two scheduler loops, a ticking loop and trigger's own pushes all drive runs
of one limited workflow (limit per key) at the same time, while the app
server is SIGKILLed twice mid-run.  The maximum number of runs of one key
executing at once is computed from the spans the step bodies record on the
database clock (a span cut by a kill ends at the kill), and never exceeds
the limit; every run completes and no slot or parked run is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import asyncpg

from flowkeeper.scheduler import SchedulerLoop
from tests.apps import flow as flow_app
from tests.helpers import KEY, make_fk

from .conftest import AppServer
from .workload import ticking, wait_finished

RUNS = int(os.environ.get("FLOW_FAULT_RUNS", "2000"))
KEYS = int(os.environ.get("FLOW_FAULT_KEYS", "50"))
LIMIT = 3


def max_overlap(spans: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = live = 0
    for _, d in points:  # an end sorts before a start at the same instant
        live += d
        best = max(best, live)
    return best


async def test_limits_hold_with_many_drivers_and_kills(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    await conn.execute(flow_app.SCHEMA_SQL)
    fk = make_fk(database_url, dispatch_lease=1.5, ack_timeout=2)
    fk.register(flow_app.limited_workflow)
    env = {
        "DATABASE_URL": database_url,
        "FLOWKEEPER_SIGNING_KEY": KEY,
        "FLOWKEEPER_ENDPOINT": fk.dispatcher.endpoint,  # type: ignore[union-attr]
        "FLOW_LIMIT": str(LIMIT),
        "FLOW_STEP": "0.2",
        # Longer than a loaded CI machine stalls the app: a lease lost to a stall
        # counts a lost attempt, and two SIGKILLs plus one could fail a run.
        "FAULT_LEASE": "4",
    }
    server = app_server("tests.apps.flow_app", fk.test_port, env)  # type: ignore[attr-defined]
    server.start()
    others = [
        make_fk(database_url, port=fk.test_port, dispatch_lease=1.5, ack_timeout=2)  # type: ignore[attr-defined]
        for _ in range(2)
    ]
    loops = [SchedulerLoop(o, max_idle=1.0, poll_interval=0.5) for o in others]
    tasks = [asyncio.create_task(loop.run()) for loop in loops]
    kills: list[object] = []
    ids: list[str] = []
    t0 = time.monotonic()
    try:
        async with ticking(fk, interval=0.3):
            waves = 4
            per_wave = RUNS // waves
            for wave in range(waves):
                batch = range(wave * per_wave, (wave + 1) * per_wave)
                for chunk in range(0, per_wave, 50):
                    handles = await asyncio.gather(
                        *(
                            fk.trigger("limited", flow_app.Job(key=f"k{i % KEYS}", n=i))
                            for i in batch[chunk : chunk + 50]
                        )
                    )
                    ids += [h.run_id for h in handles]
                if wave in (1, 2):
                    await asyncio.sleep(0.1)  # inside some steps
                    server.kill()
                    kills.append(await conn.fetchval("SELECT clock_timestamp()"))
                    await asyncio.sleep(0.3)
                    server.start()
            await wait_finished(database_url, ids, timeout=240)
    finally:
        for loop in loops:
            loop.stop()
        for task in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 15)
        server.stop()
        for o in others:
            await o.aclose()
        await fk.aclose()
    took = time.monotonic() - t0

    statuses = await conn.fetch(
        "SELECT status, count(*) AS n FROM flowkeeper.runs GROUP BY status ORDER BY status"
    )
    assert {r["status"]: r["n"] for r in statuses} == {"completed": RUNS}
    rows = await conn.fetch("SELECT key, started, ended FROM flow_log ORDER BY started")
    by_key: dict[str, list[tuple[float, float]]] = {}
    cut = 0
    for r in rows:
        end = r["ended"]
        if end is None:  # killed inside the step: it ended with its process
            end = min(k for k in kills if k >= r["started"])  # type: ignore[operator]
            cut += 1
        by_key.setdefault(r["key"], []).append((r["started"].timestamp(), end.timestamp()))
    peaks = {k: max_overlap(v) for k, v in by_key.items()}
    assert len(peaks) == KEYS
    assert max(peaks.values()) <= LIMIT, peaks
    assert max(peaks.values()) == LIMIT  # the limit was reached, so it was tested
    assert server.kills == 2
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.slots") == 0
    assert (
        await conn.fetchval("SELECT count(*) FROM flowkeeper.runs WHERE blocked_key IS NOT NULL")
        == 0
    )
    blocked = await conn.fetchval("SELECT count(*) FROM flowkeeper.events WHERE kind = 'blocked'")
    print(
        f"\nflow limits: {RUNS} runs over {KEYS} keys (limit {LIMIT}) in {took:.1f}s, "
        f"4 drivers, {server.kills} SIGKILLs ({cut} steps cut), {blocked} parkings, "
        f"peak per key {max(peaks.values())}"
    )
