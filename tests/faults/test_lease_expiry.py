"""A slow step outlives its lease: SIGSTOP its server, let another take over, SIGCONT.

Server A runs every run's "slow" step when it is frozen (SIGSTOP: no
heartbeat, no progress).  Once the leases expire, ticks send the runs to
server B, which re-executes "slow" (its result was never recorded, so that
is allowed) and completes them.  Then A wakes up with its stale step results
in hand: it must write nothing — not its results, not a status, not an
event — and must not go on to the next step.
"""

from __future__ import annotations

import asyncio
import signal

import asyncpg
import httpx
import pytest

from tests.apps import crashy
from tests.helpers import KEY, make_fk

from .conftest import AppServer
from .workload import check_runs, ticking, wait_finished

RUNS = 20
LEASE = "1.0"


async def snapshot(conn: asyncpg.Connection) -> tuple[object, ...]:
    """Everything a stale invocation could write, as it stands now."""
    return (
        await conn.fetch("SELECT * FROM flowkeeper.runs ORDER BY id"),
        await conn.fetch("SELECT * FROM flowkeeper.steps ORDER BY run_id, key"),
        await conn.fetch("SELECT * FROM flowkeeper.events ORDER BY id"),
    )


@pytest.mark.slow
async def test_stale_invocation_past_its_lease_writes_nothing(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    await conn.execute(crashy.SCHEMA_SQL)
    env = {"DATABASE_URL": database_url, "FLOWKEEPER_SIGNING_KEY": KEY, "FAULT_LEASE": LEASE}
    fk_a = make_fk(database_url)  # triggers: pushes to A
    fk_b = make_fk(database_url, dispatch_lease=float(LEASE))  # ticks: dispatches to B
    for fk in (fk_a, fk_b):
        fk.register(crashy.stalling_workflow)
    servers = {}
    for name, fk in (("a", fk_a), ("b", fk_b)):
        endpoint = fk.dispatcher.endpoint  # type: ignore[union-attr]
        servers[name] = app_server(
            "tests.apps.crash_app",
            fk.test_port,  # type: ignore[attr-defined]
            {**env, "FLOWKEEPER_ENDPOINT": endpoint},
        )
        servers[name].start()
    a, b = servers["a"], servers["b"]
    assert a.proc is not None
    try:
        handles = await asyncio.gather(*(fk_a.trigger("stalling", i) for i in range(RUNS)))
        ids = [h.run_id for h in handles]

        async def all_inside_slow() -> bool:
            n = await conn.fetchval("SELECT count(*) FROM fault_log WHERE key = 'slow'")
            return bool(n == RUNS)

        for _ in range(200):
            if await all_inside_slow():
                break
            await asyncio.sleep(0.05)
        assert await all_inside_slow(), "server A never got every run into its slow step"
        a.proc.send_signal(signal.SIGSTOP)
        try:
            async with ticking(fk_b, interval=0.2):
                await wait_finished(database_url, ids, timeout=60)
            before = await snapshot(conn)
        finally:
            a.proc.send_signal(signal.SIGCONT)
        # A is running again: its frozen slow steps end at once (their timers are
        # long past) and it tries to carry on.  Give it the time to try.
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{a.port}/api/flowkeeper/", timeout=10)
        await asyncio.sleep(float(LEASE) * 2)
        after = await snapshot(conn)
    finally:
        for server in servers.values():
            server.stop()
        for fk in (fk_a, fk_b):
            await fk.aclose()

    checked = await check_runs(conn, ids, steps=crashy.STALLING_STEPS, stalls_injected=1)
    assert after == before, "the stale invocation wrote after its lease was taken over"
    # "slow" ran twice per run (A's stale execution, then B's); the others once.
    per_key = dict(await conn.fetch("SELECT key, count(*) FROM fault_log GROUP BY key"))
    assert per_key == {"before": RUNS, "slow": 2 * RUNS, "after": RUNS}, per_key
    # Every recorded "slow" result is B's: none of A's stale results got in.
    writers = await conn.fetch(
        "SELECT DISTINCT output::text::int AS pid FROM flowkeeper.steps WHERE key = 'slow'"
    )
    assert b.proc is not None
    assert [r["pid"] for r in writers] == [b.proc.pid]
    print(
        f"\nlease expiry: {RUNS} runs frozen mid-step in server A past their lease, "
        f"taken over by server B; A wrote nothing after waking ({checked.executions} executions)"
    )
