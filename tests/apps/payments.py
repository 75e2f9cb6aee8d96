"""Workflows of the payments fault tests, run in a uvicorn subprocess the tests SIGKILL.

``charging`` charges a fake provider three times per run (a loop: ``charge``,
``charge#2``, ``charge#3``) passing ``ctx.idempotency_key``; the step kills
its own process right after the provider answered (before the result can be
recorded) whenever the provider says it saw that key for the first time and
the key's hash says so: the crash the idempotency key exists for.

``ordering`` records an order in the app's own table with ``ctx.transaction``
while the test SIGKILLs the process at random moments.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
from typing import Any

import asyncpg
import httpx

from flowkeeper import Context, RetryPolicy, define_workflow

CHARGES = 3
PATIENT = RetryPolicy(max_attempts=30, initial_delay=0.05, max_delay=0.2)


def _doomed(key: str) -> bool:
    """Whether the first answer for ``key`` is lost in a crash (about a third of them)."""
    return hashlib.sha256(key.encode()).digest()[0] % 3 == 0


async def charge(ctx: Context, amount: int) -> dict[str, Any]:
    key = ctx.idempotency_key
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.post(
            os.environ["PROVIDER_URL"] + "/charges",
            json={"amount": amount},
            headers={"Idempotency-Key": key},
        )
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    if answer["seen"] == 1 and _doomed(key) and os.environ.get("PROVIDER_CRASH") == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # the provider answered; nothing is recorded
    return {"charge_id": answer["charge_id"], "key": key}


async def charging(ctx: Context, amount: int) -> list[dict[str, Any]]:
    return [
        await ctx.step("charge", charge, ctx, amount + i, retry=PATIENT) for i in range(CHARGES)
    ]


ORDERS_SQL = """
CREATE TABLE IF NOT EXISTS app_orders (
    id bigserial PRIMARY KEY,
    run_id uuid NOT NULL,
    n integer NOT NULL,
    txid bigint NOT NULL
);
"""


async def record_order(conn: asyncpg.Connection, run_id: str, n: int) -> dict[str, int]:
    # A pause inside the transaction, so that kills land inside it too.
    await asyncio.sleep(random.uniform(0, float(os.environ.get("ORDER_DELAY", "0.02"))))
    row = await conn.fetchrow(
        "INSERT INTO app_orders (run_id, n, txid) VALUES ($1, $2, txid_current()) "
        "RETURNING id, txid",
        run_id,
        n,
    )
    assert row is not None
    await asyncio.sleep(random.uniform(0, float(os.environ.get("ORDER_DELAY", "0.02"))))
    return {"order_id": row["id"], "txid": row["txid"]}


async def noop(n: int) -> int:
    await asyncio.sleep(random.uniform(0, 0.01))
    return n


async def ordering(ctx: Context, n: int) -> dict[str, int]:
    await ctx.step("before", noop, n, retry=PATIENT)
    order = await ctx.transaction("record-order", record_order, ctx.run_id, n, retry=PATIENT)
    await ctx.step("after", noop, n, retry=PATIENT)
    return order


charging_workflow = define_workflow("charging", charging)
ordering_workflow = define_workflow("ordering", ordering)
