"""trigger() hands a new run to the endpoint, which creates and starts it in one write."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import asyncpg
import httpx

from flowkeeper import Context, FlowKeeper
from flowkeeper.signing import sign_request

from ..helpers import KEY, drive, make_fk, serve


def _counting(fk: FlowKeeper, calls: Counter[str]) -> None:
    @fk.workflow("w")
    async def w(ctx: Context, n: int) -> int:
        return await ctx.step("double", lambda: calls.update(["double"]) or n * 2)


async def test_a_pushed_trigger_costs_one_statement_and_one_request(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    calls: Counter[str] = Counter()
    _counting(fk, calls)
    async with serve(fk):
        handle = await fk.trigger("w", 21)
        assert handle.created
        assert await fk.result(handle.run_id, timeout=10) == 42
    row = await conn.fetchrow(
        "SELECT status, invocations, started_at IS NOT NULL AS started FROM flowkeeper.runs"
    )
    assert dict(row) == {"status": "completed", "invocations": 1, "started": True}
    assert calls == {"double": 1}


async def test_idempotency_key_through_the_endpoint(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    calls: Counter[str] = Counter()
    _counting(fk, calls)
    async with serve(fk):
        first = await fk.trigger("w", 1, idempotency_key="order-1")
        again = await fk.trigger("w", 2, idempotency_key="order-1")
        await fk.result(first.run_id, timeout=10)
    assert first.created and not again.created
    assert again.run_id == first.run_id
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == 1
    assert calls == {"double": 1}


async def test_a_replayed_create_request_creates_nothing_more(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    calls: Counter[str] = Counter()
    _counting(fk, calls)
    run_id = "01a21600-0000-7000-8000-000000000001"
    body = json.dumps(
        {
            "run_id": run_id,
            "lease": None,
            "create": {"workflow": "w", "input": 5, "idempotency_key": None},
        }
    ).encode()
    headers = sign_request(KEY, method="POST", path="/api/flowkeeper/", body=body)
    async with serve(fk) as server, httpx.AsyncClient() as client:
        answers = await asyncio.gather(
            *(
                client.post(f"{server.base_url}/api/flowkeeper/", content=body, headers=headers)
                for _ in range(5)
            )
        )
        await drive(fk, [run_id])
        late = await client.post(
            f"{server.base_url}/api/flowkeeper/", content=body, headers=headers
        )
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 200, 202]
    assert all(a.json()["run_id"] == run_id for a in answers)
    assert late.json()["reason"] == "finished"
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == 1
    assert calls == {"double": 1}


async def test_no_answer_in_time_falls_back_to_inserting_the_same_run(
    database_url: str, conn: asyncpg.Connection
) -> None:
    # The endpoint is slow to answer (a cold start, a buffering host): the
    # trigger gives up waiting and inserts the run itself, under the same id.
    fk = make_fk(database_url, ack_timeout=0.001)
    calls: Counter[str] = Counter()
    _counting(fk, calls)
    try:
        async with serve(fk):
            handle = await fk.trigger("w", 4)
            assert handle.created
            await drive(fk, [handle.run_id])
        assert await fk.result(handle.run_id) == 8
        assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == 1
        assert calls == {"double": 1}
    finally:
        await fk.aclose()


async def test_the_endpoint_without_the_workflow_defers_the_handed_run(
    database_url: str, conn: asyncpg.Connection
) -> None:
    serving = make_fk(database_url)  # knows no workflow (an instance on older code)
    trigger_side = make_fk(database_url, port=serving.test_port)  # type: ignore[attr-defined]
    _counting(trigger_side, Counter())
    try:
        async with serve(serving):
            handle = await trigger_side.trigger("w", 1)
        assert handle.created
        info = await trigger_side.get_run(handle.run_id)
        assert info.status == "queued"  # created, and deferred: not failed
        assert info.error is None
        assert info.due_at is not None and info.due_at > await trigger_side.store.clock_now()
        assert [e.kind for e in info.events] == ["workflow_unknown"]
        assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == 1
    finally:
        await serving.aclose()
        await trigger_side.aclose()


async def test_large_inputs_are_inserted_then_pushed(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    @fk.workflow("big")
    async def big(ctx: Context, blob: str) -> int:
        return await ctx.step("size", lambda: len(blob))

    blob = "x" * fk.max_body_bytes  # too big to travel in an invocation
    async with serve(fk):
        handle = await fk.trigger("big", blob)
        assert await fk.result(handle.run_id, timeout=10) == len(blob)
