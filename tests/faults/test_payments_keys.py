"""Stable idempotency keys under crashes after the provider answered, before the record.

Each run charges a fake provider three times in a loop, with
``ctx.idempotency_key``.  The app kills itself (SIGKILL) right after the
provider answered about a third of the first requests, so those steps'
results are never recorded and the steps run again in a new process.  The
provider must have seen those keys more than once, yet created exactly one
charge per key; each run's recorded charges are the provider's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import asyncpg

from flowkeeper.testing.postgres import free_port
from tests.apps import payments
from tests.helpers import KEY, Served, make_fk

from .conftest import AppServer
from .provider import FakeProvider
from .summary import record
from .workload import ticking, wait_finished

RUNS = 8


async def _restarting(server: AppServer, stop: asyncio.Event) -> None:
    """Start the app again whenever it killed itself."""
    while not stop.is_set():
        assert server.proc is not None
        if server.proc.poll() is not None:
            server.kills += 1
            await asyncio.to_thread(server.start)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def test_provider_charges_once_per_key_through_crashes(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    provider = FakeProvider()
    provider_port = free_port()
    fk = make_fk(database_url, dispatch_lease=1.5, ack_timeout=2)
    fk.register(payments.charging_workflow)
    server = app_server(
        "tests.apps.payments_app",
        fk.test_port,  # type: ignore[attr-defined]
        {
            "DATABASE_URL": database_url,
            "FLOWKEEPER_SIGNING_KEY": KEY,
            "FLOWKEEPER_ENDPOINT": fk.dispatcher.endpoint,  # type: ignore[union-attr]
            "PROVIDER_URL": f"http://127.0.0.1:{provider_port}",
            "PROVIDER_CRASH": "1",
        },
    )
    stop = asyncio.Event()
    async with Served(provider.app, provider_port):
        server.start()
        watcher = asyncio.create_task(_restarting(server, stop))
        try:
            async with ticking(fk):
                handles = [await fk.trigger("charging", 100 * i) for i in range(RUNS)]
                ids = [h.run_id for h in handles]
                await wait_finished(database_url, ids, timeout=150)
        finally:
            stop.set()
            await watcher
            server.stop()
            await fk.aclose()

    rows = await conn.fetch(
        "SELECT id::text, status, output::text AS output FROM flowkeeper.runs "
        "WHERE id = ANY($1::uuid[])",
        ids,
    )
    keys = list(provider.seen)
    retried = [k for k in keys if provider.seen[k] > 1]
    record(runs_driven=RUNS, kills_injected=server.kills)
    assert all(r["status"] == "completed" for r in rows), [dict(r) for r in rows]
    assert server.kills > 0, "no crash happened after the provider answered"
    assert retried, "no key reached the provider twice: the crash path was not exercised"
    # Exactly one charge per key, and one key per (run, loop occurrence).
    assert set(provider.created.values()) == {1}
    assert len(keys) == RUNS * payments.CHARGES
    for r in rows:
        charges = json.loads(r["output"])
        assert len({c["key"] for c in charges}) == payments.CHARGES
        for c in charges:
            assert provider.charges[c["key"]] == c["charge_id"]
            assert c["key"].startswith(r["id"])
