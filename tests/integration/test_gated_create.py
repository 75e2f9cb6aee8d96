"""The endpoint's one-statement create of a flow-controlled run (migration 0018).

Claimed when its keys have room, parked (not claimed) when they have none, and
a replayed or conflicting create answered as create_claimed answers it.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest

from flowkeeper import Concurrency, Context, RunNotFoundError
from flowkeeper.store import ClaimedRun

from ..helpers import drive, make_fk, serve

LEASE = timedelta(seconds=30)


async def test_created_claimed_parked_replayed_and_conflicting(database_url: str) -> None:
    fk = make_fk(database_url)

    # Keys that look like other keys: the scope separator, SQL, a lone key.
    @fk.workflow("gated", concurrency=Concurrency(limit=1, key=lambda inp: inp["k"]))
    async def gated(ctx: Context, inp: dict[str, Any]) -> str:
        return str(inp["k"])

    wf = fk.registry.get("gated")
    store = fk.store

    async def create(run_id: str, key: str, idem: str | None = None) -> Any:
        text = f'{{"k": "{key}"}}'
        return await store.create_gated(
            run_id=run_id,
            workflow="gated",
            input_json=text,
            idempotency_key=idem,
            lease=LEASE,
            flow=wf.flow(text),
            priority=0,
            timeout=None,
            start_timeout=None,
        )

    try:
        await store.ensure_schema()
        first, second, third = (str(uuid.uuid4()) for _ in range(3))
        claimed = await create(first, "k'; --", idem="order-1")
        assert isinstance(claimed, ClaimedRun) and claimed.run_id == first
        assert await create(second, "k'; --") is None  # the key's one slot is held: parked
        info = await fk.get_run(second)
        assert info.status.value == "queued"
        assert await create(first, "k'; --", idem="order-1") == (first, True)  # a replay
        assert await create(third, "other", idem="order-1") == (first, False)  # key taken
        with pytest.raises(RunNotFoundError):  # nothing half-created
            await fk.get_run(third)
        async with serve(fk):
            # The first run's last write frees its slot and wakes the parked run.
            await store.commit(first, claimed.lease_token, status="completed", output='"done"')
            statuses = await drive(fk, [first, second])
        assert statuses == {first: "completed", second: "completed"}
    finally:
        await fk.aclose()


async def test_a_run_created_with_room_is_the_run_an_insert_and_a_claim_make(
    database_url: str,
) -> None:
    """The one-row create (migration 0019) leaves what insert_run + claim_run leave."""
    fk = make_fk(database_url)

    @fk.workflow(
        "roomy",
        concurrency=[Concurrency(limit=5, key=lambda inp: inp["k"]), Concurrency(limit=50)],
        priority=7,
        timeout=timedelta(hours=1),
        start_timeout=timedelta(minutes=10),
        version="v1",
    )
    async def roomy(ctx: Context, inp: dict[str, Any]) -> None:
        return None

    wf = fk.registry.get("roomy")
    store = fk.store
    text = '{"k": "k1"}'
    flow = wf.flow(text)
    common: dict[str, Any] = {
        "workflow": "roomy",
        "input_json": text,
        "idempotency_key": None,
        "timeout": wf.timeout,
        "start_timeout": wf.start_timeout,
        "code_version": "v1",
    }
    try:
        await store.ensure_schema()
        fast = str(uuid.uuid4())
        made = await store.create_gated(
            run_id=fast, lease=LEASE, flow=flow, priority=wf.priority, **common
        )
        assert isinstance(made, ClaimedRun)
        slow = str(uuid.uuid4())
        await store.insert_run(
            run_id=slow,
            lease_token=None,
            lease=timedelta(0),
            flow_keys=flow.keys,
            flow_limits=flow.limits,
            priority=wf.priority,
            **common,
        )
        assert await store.claim(slow, None, uuid.uuid4(), LEASE) is not None
        async with fk.db.acquire() as conn:
            rows = {
                str(r["id"]): dict(r)
                for r in await conn.fetch(
                    """SELECT id, workflow, status, input::text AS input, invocations,
                              executing, flow_keys, flow_limits, priority, code_version,
                              blocked_key, rate_keys, lost_attempts, step_key,
                              started_at IS NOT NULL AS started,
                              round(extract(epoch FROM deadline - started_at)) AS timeout,
                              round(extract(epoch FROM start_deadline - created_at)) AS st,
                              round(extract(epoch FROM due_at - started_at)) AS lease,
                              (SELECT array_agg(key ORDER BY key) FROM flowkeeper.slots s
                               WHERE s.run_id = r.id) AS slots
                       FROM flowkeeper.runs r"""
                )
            }
        a, b = rows.pop(fast), rows.pop(slow)
        a.pop("id"), b.pop("id")
        assert a == b
        assert a["status"] == "running" and a["slots"] == sorted(flow.keys or [])
        assert a["timeout"] == 3600 and a["st"] == 600 and a["lease"] == 30
    finally:
        await fk.aclose()
