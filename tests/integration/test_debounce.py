"""Debounce: a burst of triggers for one key becomes one run, with the latest input,
started once the key has been quiet for the period."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowkeeper import ConfigurationError, Context, Debounce, FlowKeeper, InvalidInputError

from ..helpers import KEY, drive, serve, shape


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


# Keys that quote, leave ASCII, break lines, and look like the generated key prefixes.
_keys = st.sampled_from(["a", 'o\'brien "q"', "ключ", "x\u2028y", "wf:reindex:a", "scope:a"])
# Event data: NUL and lone surrogates are refused with a clear error (test_events.py).
_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8
)
_data = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(_text, c, max_size=3),
    max_leaves=8,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sends=st.lists(
        st.tuples(_keys, _data, st.sampled_from([None, None, "e1", "e2"])), min_size=1, max_size=10
    )
)
async def test_a_debounced_on_event_workflow_merges_each_keys_events_into_one_run(
    database_url: str, sends: list[tuple[str, Any, str | None]]
) -> None:
    fk = FlowKeeper(database_url, signing_key=KEY)
    event = f"doc.{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(database_url)
    try:

        @fk.workflow(
            f"reindex-{event}",
            on_event=event,
            debounce=Debounce(timedelta(hours=1), key=lambda d: d["doc"]),
        )
        async def reindex(ctx: Context, data: dict[str, Any]) -> None:
            return None

        latest: dict[str, Any] = {}
        run_of: dict[str, set[str]] = {}
        ids: set[str] = set()
        for key, value, tag in sends:
            event_id = None if tag is None else f"{event}-{tag}"  # event ids are global
            sent = await fk.send_event(event, {"doc": key, "value": value}, id=event_id)
            if event_id is not None and event_id in ids:
                assert sent.duplicate and sent.started == []  # a duplicate merges nothing
                continue
            if event_id is not None:
                ids.add(event_id)
            latest[key] = value
            assert len(sent.started) == 1
            run_of.setdefault(key, set()).update(sent.started)
        assert all(len(runs) == 1 for runs in run_of.values())  # one run per key
        rows = await conn.fetch(
            "SELECT id::text, input::text AS input, status FROM flowkeeper.runs WHERE workflow = $1",
            f"reindex-{event}",
        )
        assert len(rows) == len(latest)
        for key, runs in run_of.items():
            (row,) = [r for r in rows if r["id"] in runs]
            assert row["status"] == "queued"
            assert shape(json.loads(row["input"])) == shape({"doc": key, "value": latest[key]})
    finally:
        await conn.close()
        await fk.aclose()


async def test_a_burst_of_events_starts_one_run_once_quiet(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    seen: list[tuple[str, int, float]] = []

    @fk.workflow(
        "reindex-on-edit",
        on_event="doc.edited",
        debounce=Debounce(timedelta(seconds=0.6), key=lambda e: e["doc"]),
    )
    async def reindex(ctx: Context, edit: dict[str, Any]) -> int:
        seen.append((edit["doc"], edit["version"], time.monotonic()))
        return int(edit["version"])

    @fk.workflow("audit-edit", on_event="doc.edited")  # an undebounced listener of the same event
    async def audit(ctx: Context, edit: dict[str, Any]) -> None:
        return None

    async with serve(fk):
        started: set[str] = set()
        for v in range(100):
            sent = await fk.send_event("doc.edited", {"doc": "a", "version": v})
            started.update(sent.started)
        last = time.monotonic()
        debounced = await conn.fetch(
            "SELECT id::text FROM flowkeeper.runs WHERE workflow = 'reindex-on-edit'"
        )
        assert len(debounced) == 1
        assert len(started) == 101  # the debounced run, and one audit run per event
        await drive(fk, list(started), timeout=30)
    assert [(doc, v) for doc, v, _ in seen] == [("a", 99)]  # once, with the latest data
    assert seen[0][2] >= last + 0.5  # started once quiet for the period


async def test_an_event_whose_debounce_key_cannot_be_made_is_not_sent(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    @fk.workflow(
        "reindex-strict",
        on_event="doc.changed",
        debounce=Debounce(timedelta(seconds=30), key=lambda e: e["doc"]),
    )
    async def reindex(ctx: Context, edit: dict[str, Any]) -> None:
        return None

    for bad in ({"no-doc": 1}, {"doc": 7}, {"doc": ""}):
        with pytest.raises(InvalidInputError, match="debounce key"):
            await fk.send_event("doc.changed", bad)
    assert await fk.list_events(name="doc.changed") == []
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == 0
