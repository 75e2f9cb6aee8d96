"""Debounce: a burst of triggers for one key becomes one run, with the latest input,
started once the key has been quiet for the period."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import pytest

from flowkeeper import ConfigurationError, Context, Debounce, FlowKeeper

from ..helpers import drive, serve


@dataclass
class Edit:
    doc: str
    version: int


async def test_a_burst_of_100_becomes_one_run_with_the_latest_input(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    seen: list[tuple[str, int, float]] = []

    @fk.workflow("reindex", debounce=Debounce(timedelta(seconds=0.6), key=lambda e: e.doc))
    async def reindex(ctx: Context, edit: Edit) -> int:
        seen.append((edit.doc, edit.version, time.monotonic()))
        return edit.version

    async with serve(fk):
        handles = []
        for v in range(100):
            handles.append(await fk.trigger("reindex", Edit("a", v)))
            if v % 10 == 0:  # and some concurrent ones for another key
                handles += await asyncio.gather(
                    *(fk.trigger("reindex", Edit("b", v * 10 + i)) for i in range(3))
                )
        last = time.monotonic()
        ids = {h.run_id for h in handles[::1]}
        assert len(ids) == 2  # one run per key
        assert sum(h.created for h in handles) == 2
        with pytest.raises(ConfigurationError, match="idempotency_key does not apply"):
            await fk.trigger("reindex", Edit("a", 0), idempotency_key="x")
        await drive(fk, list(ids), timeout=20)
        # Once it has started, the next trigger of the key is a new burst.
        later = await fk.trigger("reindex", Edit("a", 500))
        assert later.created and later.run_id not in ids
        await drive(fk, [later.run_id], timeout=20)
    by_doc = {doc: (v, at) for doc, v, at in seen if v != 500}
    assert by_doc["a"][0] == 99  # the latest input
    assert by_doc["b"][0] in {900, 901, 902}  # one of the last (concurrent) triggers
    assert by_doc["a"][1] >= last + 0.5  # started once quiet for the period
    assert [v for doc, v, _ in seen if doc == "a"] == [99, 500]
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == 3


def test_bad_debounce() -> None:
    for bad in (timedelta(0), timedelta(seconds=-1), 30):
        with pytest.raises(ConfigurationError, match="Debounce"):
            Debounce(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="function"):
        Debounce(timedelta(seconds=1), key="doc")  # type: ignore[arg-type]
