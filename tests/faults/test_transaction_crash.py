"""SIGKILL the app at random moments inside and around ``ctx.transaction``, over 300 runs.

Each ``ordering`` run inserts one row into the app's own table inside
``ctx.transaction`` (with pauses inside the transaction, so kills land
before the insert, after it, and between it and the commit), between two
plain steps.  Afterwards, from the user's own table: every run's row exists
exactly once, and every run's recorded result (and output) is that row.
"""

from __future__ import annotations

import asyncio
import json
import random

import asyncpg

from tests.apps import payments
from tests.helpers import KEY, make_fk

from .conftest import AppServer
from .summary import record
from .workload import ticking, wait_finished

WAVES = 15
RUNS_PER_WAVE = 20


async def test_transaction_step_writes_exactly_once_through_sigkills(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    await conn.execute(payments.ORDERS_SQL)
    fk = make_fk(database_url, dispatch_lease=1.5, ack_timeout=2)
    fk.register(payments.ordering_workflow)
    server = app_server(
        "tests.apps.payments_app",
        fk.test_port,  # type: ignore[attr-defined]
        {
            "DATABASE_URL": database_url,
            "FLOWKEEPER_SIGNING_KEY": KEY,
            "FLOWKEEPER_ENDPOINT": fk.dispatcher.endpoint,  # type: ignore[union-attr]
            "ORDER_DELAY": "0.05",
        },
    )
    server.start()
    rng = random.Random(20261201)
    ids: list[str] = []
    try:
        async with ticking(fk):
            for wave in range(WAVES):
                handles = await asyncio.gather(
                    *(
                        fk.trigger("ordering", wave * RUNS_PER_WAVE + i)
                        for i in range(RUNS_PER_WAVE)
                    )
                )
                ids += [h.run_id for h in handles]
                await asyncio.sleep(rng.uniform(0.02, 0.3))  # inside some transactions
                server.kill()
                await asyncio.sleep(rng.uniform(0.0, 0.2))
                server.start()
            await wait_finished(database_url, ids, timeout=180)
    finally:
        server.stop()
        await fk.aclose()

    runs = await conn.fetch(
        "SELECT id::text, status, output::text AS output FROM flowkeeper.runs "
        "WHERE id = ANY($1::uuid[])",
        ids,
    )
    recorded = {
        str(r["run_id"]): json.loads(r["output"])
        for r in await conn.fetch(
            "SELECT run_id, output::text AS output FROM flowkeeper.steps "
            "WHERE key = 'record-order' AND kind = 'transaction' AND status = 'completed'"
        )
    }
    rows: dict[str, list[dict[str, int]]] = {}
    for r in await conn.fetch("SELECT run_id, id, txid FROM app_orders"):
        rows.setdefault(str(r["run_id"]), []).append({"order_id": r["id"], "txid": r["txid"]})
    lost = await conn.fetchval(
        "SELECT count(*) FROM flowkeeper.events WHERE kind = 'attempt_lost' "
        "AND step_key = 'record-order'"
    )
    record(runs_driven=len(ids), kills_injected=server.kills, lost_attempts_counted=lost)

    assert len(runs) == WAVES * RUNS_PER_WAVE
    not_completed = [dict(r) for r in runs if r["status"] != "completed"]
    assert not not_completed, not_completed[:5]
    twice = {rid: v for rid, v in rows.items() if len(v) != 1}
    assert not twice, f"{len(twice)} runs wrote their row more than once: {list(twice.items())[:3]}"
    assert set(rows) == set(ids), "a run's row is missing"
    for r in runs:
        assert recorded[r["id"]] == rows[r["id"]][0]
        assert json.loads(r["output"]) == rows[r["id"]][0]
    assert server.kills == WAVES
    assert lost > 0, "no kill landed inside a transaction step"
    print(f"\ntransaction crash: {len(ids)} runs, {server.kills} SIGKILLs, {lost} lost attempts")
