"""The same signed invocation delivered many times, concurrently and out of order.

The test's dispatcher plays an at-least-once network: every invocation the
scheduler or a trigger sends goes out several times at once, and every 0.1 s
a random sample of earlier requests — byte-for-byte copies, carrying lease
tokens the runs have since moved past — is delivered again, shuffled.  Nothing here
kills anything, so each step body must run exactly once, and every copy
must be refused politely (200 with ``accepted: false``), never an error.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import httpx

from flowkeeper.dispatch import Delivery, Dispatcher
from tests.apps import crashy
from tests.helpers import KEY, make_fk

from .conftest import AppServer
from .workload import check_runs, ticking, wait_finished

RUNS = 60
COPIES = 4  # each invocation is delivered this many times at once
REPLAYS_PER_TICK = 30


class DuplicatingDispatcher(Dispatcher):
    """Delivers each invocation ``COPIES`` times at once; replays old ones byte for byte."""

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rng = random.Random(seed)
        self.signed_requests: list[tuple[str, bytes, dict[str, str]]] = []
        self.deliveries: list[tuple[int | None, dict[str, Any] | None]] = []

    def sign_body(self, route: str, body: bytes) -> tuple[str, bytes, dict[str, str]]:
        request = super().sign_body(route, body)
        self.signed_requests.append(request)
        return request

    async def invoke(self, run_id: str, token: str | None, *, wait: bool = False) -> Delivery:
        send = super().invoke
        copies = await asyncio.gather(*(send(run_id, token) for _ in range(COPIES)))
        return self._winner(copies)

    async def create(
        self, run_id: str, workflow: str, input_json: str, idempotency_key: str | None
    ) -> Delivery:
        # trigger() hands new runs over this way: duplicate those requests too.
        send = super().create
        copies = await asyncio.gather(
            *(send(run_id, workflow, input_json, idempotency_key) for _ in range(COPIES))
        )
        return self._winner(copies)

    def _winner(self, copies: list[Delivery]) -> Delivery:
        self.deliveries += [(d.status_code, d.body) for d in copies]
        # The caller sees the copy that won, as it would see the one that got there.
        return next((d for d in copies if d.body and d.body.get("accepted")), copies[0])

    async def replay(self, http: httpx.AsyncClient) -> None:
        """Deliver a shuffled sample of earlier requests again, the very same bytes."""
        sample = self.rng.sample(
            self.signed_requests, min(len(self.signed_requests), REPLAYS_PER_TICK)
        )

        async def post(url: str, body: bytes, headers: dict[str, str]) -> None:
            response = await http.post(url, content=body, headers=headers)
            self.deliveries.append((response.status_code, response.json()))

        await asyncio.gather(*(post(*request) for request in sample))


async def test_duplicate_and_stale_invocations_run_each_step_once(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    await conn.execute(crashy.SCHEMA_SQL)
    fk = make_fk(database_url)
    fk.register(crashy.crashy_workflow)
    assert fk.dispatcher is not None
    endpoint = fk.dispatcher.endpoint
    dispatcher = DuplicatingDispatcher(endpoint, fk.signer, seed=99)
    fk.dispatcher = dispatcher
    server = app_server(
        "tests.apps.crash_app",
        fk.test_port,  # type: ignore[attr-defined]
        {
            "DATABASE_URL": database_url,
            "FLOWKEEPER_SIGNING_KEY": KEY,
            "FLOWKEEPER_ENDPOINT": endpoint,
            "FAULT_STEP_DELAY": "0.2",  # runs live long enough to be replayed mid-way
            # Longer than a loaded CI machine stalls the app: a lease lost to a stall
            # re-runs an unrecorded step legitimately, which this test would count.
            "FAULT_LEASE": "4",
        },
    )
    server.start()

    async def replaying() -> None:
        # A fresh connection per request: a kept-alive one would wait for the
        # segment its previous 202 started.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            while True:
                await dispatcher.replay(http)
                await asyncio.sleep(0.1)

    try:
        async with ticking(fk, interval=0.1):
            replays = asyncio.create_task(replaying())
            handles = await asyncio.gather(*(fk.trigger("crashy", i) for i in range(RUNS)))
            ids = [h.run_id for h in handles]
            await wait_finished(database_url, ids, timeout=90)
            replays.cancel()
    finally:
        server.stop()
        await fk.aclose()

    deliveries = dispatcher.deliveries
    accepted = [body for code, body in deliveries if code == 202]
    refused = [
        body or {} for code, body in deliveries if code == 200 and body and not body["accepted"]
    ]
    checked = await check_runs(conn, ids, duplicates_attempted=len(deliveries) - len(accepted))
    # Not one step body ran twice: the copies were refused, not re-executed.
    assert checked.executions == RUNS * crashy.STEPS, checked
    assert len(accepted) + len(refused) == len(deliveries), {code for code, _ in deliveries}
    # At least one claim per run segment (two per run: the sleep splits it); no more
    # than the legitimate ones: a copy never won a run that was already taken.
    invocations = await conn.fetchval(
        "SELECT sum(invocations) FROM flowkeeper.runs WHERE id = ANY($1::uuid[])", ids
    )
    assert len(accepted) == invocations
    reasons = {body.get("reason") for body in refused}
    assert {"leased", "finished"} <= reasons, reasons
    print(
        f"\nduplicates: {RUNS} runs, {len(deliveries)} signed invocations delivered "
        f"({len(accepted)} accepted, {len(refused)} refused as {sorted(map(str, reasons))}), "
        f"{checked.executions} step executions"
    )
