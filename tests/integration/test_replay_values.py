"""A replay sees exactly what the first execution saw: types, key order, numbers.

Every value crosses the real database and a real suspension (a durable sleep
between two invocations): the workflow records what it saw from its input and
from its step on the first execution and again on the replay, and both must be
identical, down to dict key order and int-vs-float.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from flowkeeper import Context, FlowKeeper
from flowkeeper import store as store_module
from flowkeeper.engine import Outcome, SegmentResult

from ..helpers import KEY, shape

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    # Everything Postgres can hold in JSON text: no NUL, no lone surrogates.
    | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
            children,
            max_size=6,
        )
    ),
    max_leaves=20,
)


class Line(BaseModel):
    sku: str
    cents: int
    extra: dict[str, float]


class Invoice(BaseModel):
    lines: list[Line]
    meta: dict[str, Any]


@pytest.fixture(params=["inline", "apart"])
async def fk(
    database_url: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FlowKeeper]:
    # No endpoint: every run is executed here with fk.advance(), one invocation at a time.
    # "apart": every history is read as a large one is, by claim_history (Store.claim).
    if request.param == "apart":
        monkeypatch.setattr(store_module, "HISTORY_INLINE_STEPS", -1)
    instance = FlowKeeper(database_url, signing_key=KEY)
    try:
        yield instance
    finally:
        await instance.aclose()


async def finish(fk: FlowKeeper, run_id: str) -> list[SegmentResult]:
    """Invoke the run until it completes, waiting out its (short) sleeps."""
    import asyncio

    results: list[SegmentResult] = []
    for _ in range(50):
        result = await fk.advance(run_id)
        if isinstance(result, SegmentResult):
            results.append(result)
            if result.outcome in (Outcome.COMPLETED, Outcome.FAILED):
                return results
        await asyncio.sleep(0.02)
    raise AssertionError(f"run {run_id} did not finish: {results}")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=json_values)
async def test_step_results_and_inputs_replay_identically(fk: FlowKeeper, value: Any) -> None:
    seen: dict[str, list[tuple[str, Any]]] = fk.__dict__.setdefault("_seen", {})

    def echo(v: Any) -> Any:
        return v

    if "echo" not in fk.registry:

        @fk.workflow("echo")
        async def wf(ctx: Context, data: Any) -> Any:
            log = seen.setdefault(ctx.run_id, [])
            log.append(("input", shape(data)))
            out = await ctx.step("echo", echo, data)
            log.append(("step", shape(out)))
            await ctx.sleep("pause", timedelta(milliseconds=5))
            return out

    handle = await fk.trigger("echo", value)
    results = await finish(fk, handle.run_id)
    assert results[-1].outcome is Outcome.COMPLETED
    log = seen[handle.run_id]
    assert len(log) == 4, log
    assert log[:2] == log[2:], log
    assert log[0] == ("input", shape(value))
    assert log[1] == ("step", shape(value))
    assert shape(await fk.result(handle.run_id)) == shape(value)


async def test_a_loop_over_a_dict_replays_in_the_same_order(fk: FlowKeeper) -> None:
    """The issue's case: {"shipping": 500, "tax": 300} iterated across a sleep."""
    charged: list[tuple[str, int]] = []

    def totals() -> dict[str, int]:
        return {"shipping": 500, "tax": 300, "a": 1}

    def charge(kind: str, cents: int) -> str:
        charged.append((kind, cents))
        return kind

    @fk.workflow("charges")
    async def wf(ctx: Context) -> list[str]:
        parts = await ctx.step("totals", totals)
        done = []
        for kind, cents in parts.items():
            done.append(await ctx.step("charge", charge, kind, cents))
            await ctx.sleep("between", timedelta(milliseconds=5))
        return done

    handle = await fk.trigger("charges")
    await finish(fk, handle.run_id)
    assert await fk.result(handle.run_id) == ["shipping", "tax", "a"]
    assert charged == [("shipping", 500), ("tax", 300), ("a", 1)]


async def test_models_and_numbers_keep_their_types_across_replay(fk: FlowKeeper) -> None:
    seen: list[Any] = []

    def make() -> Invoice:
        return Invoice(
            lines=[Line(sku="z", cents=1, extra={"b": 1.0, "a": 1e300, "-": -0.0})],
            meta={"zeta": 1, "alpha": 2.5, "big": 2**64 + 1, "f": 100.0},
        )

    @fk.workflow("invoice")
    async def wf(ctx: Context) -> None:
        inv = await ctx.step("make", make)
        seen.append(shape(inv))
        await ctx.sleep("pause", timedelta(milliseconds=5))

    handle = await fk.trigger("invoice")
    await finish(fk, handle.run_id)
    assert len(seen) == 2 and seen[0] == seen[1]
    meta = dict(seen[0][1][1])[("str", "meta")]
    assert [k for k, _ in meta[1]] == [
        ("str", "zeta"),
        ("str", "alpha"),
        ("str", "big"),
        ("str", "f"),
    ]
