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
