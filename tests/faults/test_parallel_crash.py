"""SIGKILL the app in the middle of a 20-way gather: only the unfinished branches run again."""

from __future__ import annotations

import asyncio
import random

import asyncpg

from tests.apps import crashy
from tests.apps import parallel as parallel_app
from tests.helpers import KEY, make_fk, wait_for

from .conftest import AppServer
from .summary import record
from .workload import ticking, wait_finished


async def test_a_kill_mid_gather_reruns_only_unfinished_branches(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    await conn.execute(crashy.SCHEMA_SQL)
    fk = make_fk(database_url, dispatch_lease=1.5, ack_timeout=2)
    fk.register(parallel_app.gather_workflow)
    server = app_server(
        "tests.apps.parallel_app",
        fk.test_port,  # type: ignore[attr-defined]
        {
            "DATABASE_URL": database_url,
            "FLOWKEEPER_SIGNING_KEY": KEY,
            "FLOWKEEPER_ENDPOINT": fk.dispatcher.endpoint,  # type: ignore[union-attr]
            "FAULT_LEASE": "1.0",
        },
    )
    server.start()
    finished_at_kill: set[str] = set()
    try:
        handle = await fk.trigger("gather20", 0.1)
        run_id = handle.run_id

        async def some_recorded() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM flowkeeper.steps WHERE run_id = $1 AND status = 'completed'",
                run_id,
            )
            return bool(n >= 6)

        await wait_for(some_recorded, timeout=20, interval=0.01)
        server.kill()
        rows = await conn.fetch(
            "SELECT key FROM flowkeeper.steps WHERE run_id = $1 AND status = 'completed'", run_id
        )
        finished_at_kill = {r["key"] for r in rows}
        server.start()
        async with ticking(fk):
            await wait_finished(database_url, [run_id])
    finally:
        server.stop()
        await fk.aclose()

    info = await conn.fetchrow(
        "SELECT status, output::text FROM flowkeeper.runs WHERE id = $1", run_id
    )
    runs = await conn.fetch(
        "SELECT key, count(*) AS n, bool_or(recorded_before) AS again FROM fault_log "
        "WHERE run_id = $1 GROUP BY key",
        run_id,
    )
    by_key = {r["key"]: r for r in runs}
    reexecuted = sum(1 for r in runs if r["again"])
    record(runs_driven=1, kills_injected=server.kills, recorded_steps_reexecuted=reexecuted)
    assert info["status"] == "completed"
    assert 6 <= len(finished_at_kill) < parallel_app.WIDTH  # the kill really landed mid-gather
    assert reexecuted == 0
    assert all(by_key[k]["n"] == 1 for k in finished_at_kill)  # finished branches never re-ran
    unfinished = set(by_key) - finished_at_kill
    assert unfinished and all(by_key[k]["n"] >= 1 for k in unfinished)
    assert len(by_key) == parallel_app.WIDTH


CHILDREN = 200
KILLS = 6


async def test_a_parent_with_200_children_completes_under_sigkills(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    await conn.execute(crashy.SCHEMA_SQL)
    fk = make_fk(database_url, dispatch_lease=1.0, ack_timeout=2)
    for wf in (parallel_app.fanout_workflow, parallel_app.leaf_workflow):
        fk.register(wf)
    server = app_server(
        "tests.apps.parallel_app",
        fk.test_port,  # type: ignore[attr-defined]
        {
            "DATABASE_URL": database_url,
            "FLOWKEEPER_SIGNING_KEY": KEY,
            "FLOWKEEPER_ENDPOINT": fk.dispatcher.endpoint,  # type: ignore[union-attr]
            "FAULT_LEASE": "1.0",
        },
    )
    server.start()
    rng = random.Random(20261201)
    try:
        handle = await fk.trigger("fanout", CHILDREN)
        async with ticking(fk):
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.3, 1.0))
                server.kill()
                await asyncio.sleep(rng.uniform(0.0, 0.2))
                server.start()
            await wait_finished(database_url, [handle.run_id], timeout=180)
    finally:
        server.stop()
        await fk.aclose()

    children = await conn.fetch(
        "SELECT id, parent_step, status FROM flowkeeper.runs WHERE parent_id = $1", handle.run_id
    )
    twice = len(children) - len({c["parent_step"] for c in children})
    ids = [handle.run_id, *(str(c["id"]) for c in children)]
    reexecuted = await conn.fetchval(
        "SELECT count(*) FROM fault_log WHERE recorded_before AND run_id = ANY($1::uuid[])", ids
    )
    unfinished = await conn.fetchval(
        "SELECT count(*) FROM flowkeeper.runs WHERE id = ANY($1::uuid[]) AND status <> 'completed'",
        ids,
    )
    record(
        runs_driven=len(ids),
        kills_injected=server.kills,
        runs_lost=unfinished,
        recorded_steps_reexecuted=reexecuted,
        children_started=len(children),
        children_started_twice=twice,
    )
    parent = await conn.fetchrow(
        "SELECT status, output::text AS output FROM flowkeeper.runs WHERE id = $1", handle.run_id
    )
    assert parent["status"] == "completed"
    assert int(parent["output"]) == sum(i + 3 for i in range(CHILDREN))
    assert len(children) == CHILDREN and twice == 0
    assert unfinished == 0 and reexecuted == 0
    assert server.kills == KILLS
