"""100 runs start on version 1; version 2 (a new app process) patches a step and
removes another; every run completes, old ones on the old branch, new ones on the new."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from tests.apps import versioned
from tests.helpers import KEY, make_fk, wait_for

from .conftest import AppServer
from .summary import record
from .workload import ticking, wait_finished

OLD_RUNS = 100
NEW_RUNS = 20


async def test_deploy_v2_under_100_live_runs(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    fk = make_fk(database_url, dispatch_lease=2, ack_timeout=5)
    fk.register(versioned.V1)
    env = {
        "DATABASE_URL": database_url,
        "FLOWKEEPER_SIGNING_KEY": KEY,
        "FLOWKEEPER_ENDPOINT": fk.dispatcher.endpoint,  # type: ignore[union-attr]
    }
    v1 = app_server("tests.apps.versioned_app", fk.test_port, {**env, "APP_VERSION": "1"})  # type: ignore[attr-defined]
    v1.start()
    fk2 = make_fk(database_url, port=fk.test_port, dispatch_lease=2, ack_timeout=5)  # type: ignore[attr-defined]
    fk2.register(versioned.V2)
    try:
        old = [
            h.run_id
            for h in await asyncio.gather(*(fk.trigger("order", i) for i in range(OLD_RUNS)))
        ]

        async def all_sleeping() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM flowkeeper.runs WHERE status = 'sleeping' AND id = ANY($1::uuid[])",
                old,
            )
            return bool(n == OLD_RUNS)

        await wait_for(all_sleeping, timeout=30)
        v1.stop()  # the deploy: version 2 in a new process
        v2 = app_server("tests.apps.versioned_app", fk.test_port, {**env, "APP_VERSION": "2"})  # type: ignore[attr-defined]
        v2.start()
        new = [
            h.run_id
            for h in await asyncio.gather(*(fk2.trigger("order", i) for i in range(NEW_RUNS)))
        ]
        async with ticking(fk2):
            await wait_finished(database_url, old + new, timeout=90)
    finally:
        await fk.aclose()
        await fk2.aclose()

    rows = {
        str(r["id"]): r
        for r in await conn.fetch(
            "SELECT r.id, r.status, r.output::text AS output, r.error::text AS error, "
            "r.code_version, s.output::text AS branch FROM flowkeeper.runs r "
            "LEFT JOIN flowkeeper.steps s ON s.run_id = r.id AND s.kind = 'patch' "
            "AND s.key = '#patch:fraud-check-v2'"
        )
    }
    record(runs_driven=OLD_RUNS + NEW_RUNS)
    failed = [dict(r) for r in rows.values() if r["status"] != "completed"]
    assert not failed, failed[:3]
    for rid in old:
        r = rows[rid]
        assert json.loads(r["output"]) == ["a", "b", "c"], dict(r)
        assert (r["branch"], r["code_version"]) == ("false", "1")
    for rid in new:
        r = rows[rid]
        assert json.loads(r["output"]) == ["a", "fraud", "c"], dict(r)
        assert (r["branch"], r["code_version"]) == ("true", "2")
