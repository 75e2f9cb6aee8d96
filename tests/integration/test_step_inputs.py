"""Recorded step inputs never duplicate the history and never grow past their cap.

An argument that is an earlier step's output (or the workflow's input) is
recorded as a reference; any other input longer than the cap is recorded as
its size, digest and a preview.  Whatever the arguments (hypothesis: hostile
and huge values), the run completes, replays the same, and the recorded input
is valid JSON within the cap.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowkeeper import Context, FlowKeeper
from flowkeeper.stepinputs import INPUT_CAP, PREVIEW

from ..helpers import KEY
from .test_replay_values import finish

hostile_text = st.text(max_size=40) | st.sampled_from(["\x00", "\ud800", "$output_of", "é" * 3])
hostile_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats()  # NaN and infinities included: inputs are only displayed
    | st.integers()
    | hostile_text
    | st.just("x" * (INPUT_CAP * 3)),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(hostile_text, c, max_size=4),
    max_leaves=12,
)


_names = itertools.count()


@pytest.fixture
async def fk(database_url: str) -> AsyncIterator[FlowKeeper]:
    instance = FlowKeeper(database_url, signing_key=KEY)
    try:
        yield instance
    finally:
        await instance.aclose()


async def inputs(fk: FlowKeeper, run_id: str) -> dict[str, Any]:
    async with fk.db.acquire() as conn:
        rows = await conn.fetch(
            "SELECT key, input::text AS input FROM flowkeeper.steps WHERE run_id = $1",
            uuid.UUID(run_id),
        )
    return {r["key"]: None if r["input"] is None else json.loads(r["input"]) for r in rows}


async def test_an_earlier_output_is_recorded_as_a_reference(fk: FlowKeeper) -> None:
    big = "p" * 200_000

    @fk.workflow("pipe")
    async def pipe(ctx: Context, doc: dict[str, Any]) -> int:
        text = await ctx.step("fetch", lambda: big)
        parts = await ctx.step("split", lambda t: [t[:10], t[10:20]], text)
        await ctx.sleep("pause", timedelta(milliseconds=10))  # the replay gets refs too
        summary = await ctx.step("summarise", lambda p, d: len(p) + len(d), parts, doc)
        return await ctx.step("again", lambda t, n: len(t) + n, text, n=summary)

    handle = await fk.trigger("pipe", {"doc": "d" * 10_000})
    await finish(fk, handle.run_id)
    info = await fk.get_run(handle.run_id)
    assert info.output == 200_000 + 2 + 1
    recorded = await inputs(fk, handle.run_id)
    assert recorded["split"] == {"args": [None], "kwargs": {}, "$refs": [["args", 0, "fetch"]]}
    assert recorded["summarise"]["$refs"] == [["args", 0, "split"], ["args", 1, "$input"]]
    assert recorded["again"] == {
        "args": [None],
        "kwargs": {"n": 3},
        "$refs": [["args", 0, "fetch"]],
    }
    # get_run (the dashboard, runs show) shows the arguments themselves.
    shown = {s.key: s.input for s in info.steps}
    assert shown["split"] == {"args": [big], "kwargs": {}}
    assert shown["summarise"] == {"args": [["pppppppppp"] * 2, {"doc": "d" * 10_000}], "kwargs": {}}
    assert shown["again"] == {"args": [big], "kwargs": {"n": 3}}


async def test_a_value_that_looks_like_a_reference_is_only_a_value(fk: FlowKeeper) -> None:
    fake = {"$refs": [["args", 0, "x"]], "args": [1], "$output_of": "x"}

    @fk.workflow("lookalike")
    async def lookalike(ctx: Context) -> int:
        await ctx.step("x", lambda: "secret")
        return await ctx.step("y", lambda a: len(a), fake)

    handle = await fk.trigger("lookalike")
    await finish(fk, handle.run_id)
    info = await fk.get_run(handle.run_id)
    assert {s.key: s.input for s in info.steps}["y"] == {"args": [fake], "kwargs": {}}


async def test_a_long_input_is_summarised_with_its_digest(fk: FlowKeeper) -> None:
    @fk.workflow("long")
    async def long(ctx: Context) -> int:
        fresh = ["é\x00\ud800" + "z" * 1000 for _ in range(50)]  # not from the history
        return await ctx.step("count", lambda items: len(items), fresh)

    handle = await fk.trigger("long")
    await finish(fk, handle.run_id)
    summary = (await inputs(fk, handle.run_id))["count"]["$truncated"]
    assert summary["size"] > INPUT_CAP
    assert len(summary["preview"]) == PREVIEW
    assert len(summary["sha256"]) == 64
    # The summary of the same arguments is stable (what a user compares).
    from flowkeeper.stepinputs import InputRecorder

    again = InputRecorder(enabled=True).record(
        (["é\x00\ud800" + "z" * 1000 for _ in range(50)],), {}
    )
    assert again is not None and json.loads(again)["$truncated"] == summary
    full = json.loads(again)["$truncated"]["preview"]
    assert summary["sha256"] != hashlib.sha256(full.encode()).hexdigest()  # of the whole


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=hostile_values)
async def test_any_input_is_recorded_within_the_cap(fk: FlowKeeper, value: Any) -> None:
    name = f"any-{next(_names)}"

    @fk.workflow(name)
    async def anything(ctx: Context) -> str:
        await ctx.step("take", lambda *a, **k: "ok", value, value, key=value)
        await ctx.sleep("pause", timedelta(milliseconds=1))
        return "done"

    handle = await fk.trigger(name)
    results = await finish(fk, handle.run_id)
    assert results[-1].outcome.value == "completed", results
    recorded = await inputs(fk, handle.run_id)
    text = json.dumps(recorded["take"], ensure_ascii=False)
    assert len(text) <= INPUT_CAP + PREVIEW * 8, len(text)
