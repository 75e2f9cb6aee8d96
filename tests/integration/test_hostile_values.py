"""Values real applications produce, through the real database: every run ends.

NaN, infinities, NUL characters, lone surrogates, exceptions whose ``str()``
raises, names that collide with generated keys: each is refused with a clear
error where it arises, or stored in a form Postgres accepts; none makes a
write fail again and again (which re-ran the step for ever in 0.1).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowkeeper import (
    Context,
    FlowKeeper,
    InvalidInputError,
    NonRetriableError,
    RetryPolicy,
    SerializationError,
)
from flowkeeper.engine import Outcome, SegmentResult

from ..helpers import KEY

NO_WAIT = RetryPolicy(max_attempts=2, initial_delay=0, jitter=0)


@pytest.fixture
async def fk(database_url: str) -> AsyncIterator[FlowKeeper]:
    instance = FlowKeeper(database_url, signing_key=KEY, default_retry=NO_WAIT)
    try:
        yield instance
    finally:
        await instance.aclose()


async def finish(fk: FlowKeeper, run_id: str, *, most: int = 8) -> list[SegmentResult]:
    """Invoke until the run ends; a run needing more than ``most`` invocations loops."""
    results: list[SegmentResult] = []
    for _ in range(most):
        result = await fk.advance(run_id)
        if isinstance(result, SegmentResult):
            results.append(result)
            if result.outcome in (Outcome.COMPLETED, Outcome.FAILED):
                return results
        await asyncio.sleep(0.01)
    raise AssertionError(f"run {run_id} did not end in {most} invocations: {results}")


async def run_count(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM flowkeeper.runs"))
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), -float("inf"), {"total": [1, float("nan")]}, {"k": "a\x00b"}],
    ids=["nan", "inf", "-inf", "nested-nan", "nul"],
)
async def test_a_result_json_cannot_hold_fails_the_step_once(fk: FlowKeeper, value: Any) -> None:
    calls = 0

    def compute() -> Any:
        nonlocal calls
        calls += 1
        return value

    @fk.workflow("poison")
    async def wf(ctx: Context) -> None:
        await ctx.step("compute", compute)

    handle = await fk.trigger("poison")
    results = await finish(fk, handle.run_id)
    assert results[-1].outcome is Outcome.FAILED
    assert calls == 1  # deterministic: not retried
    info = await fk.get_run(handle.run_id)
    assert info.error is not None and info.error["type"] == "SerializationError"
    assert "NaN" in info.error["message"] or "NUL" in info.error["message"]
    assert [(s.key, s.status) for s in info.steps] == [("compute", "failed")]


@pytest.mark.parametrize(
    "message",
    ["NUL \x00 in the middle", "lone \ud800 surrogate", "both \udcff\x00", "\x00" * 5000],
    ids=["nul", "surrogate", "both", "many-nul"],
)
async def test_errors_with_nul_or_surrogates_are_recorded_and_retried_per_policy(
    fk: FlowKeeper, message: str
) -> None:
    calls = 0

    def flaky() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError(message)

    @fk.workflow("flaky")
    async def wf(ctx: Context) -> None:
        await ctx.step("flaky", flaky)

    handle = await fk.trigger("flaky")
    results = await finish(fk, handle.run_id)
    assert [r.outcome for r in results] == [Outcome.RETRYING, Outcome.FAILED]
    assert calls == 2  # exactly max_attempts
    info = await fk.get_run(handle.run_id)
    assert info.error is not None
    assert info.error["type"] == "RuntimeError"
    assert "\x00" not in info.error["message"]
    assert ("\\x00" in info.error["message"]) or ("\\ud800" in info.error["message"])
    assert [a.attempt for a in info.steps[0].failed_attempts] == [1, 2]


async def test_an_exception_whose_str_raises_is_still_recorded(fk: FlowKeeper) -> None:
    class Nasty(Exception):
        def __str__(self) -> str:
            raise ValueError("no")

    def step() -> None:
        raise Nasty

    @fk.workflow("nasty")
    async def wf(ctx: Context) -> None:
        await ctx.step("nasty", step, retry=RetryPolicy.none())

    handle = await fk.trigger("nasty")
    results = await finish(fk, handle.run_id)
    assert results[-1].outcome is Outcome.FAILED
    info = await fk.get_run(handle.run_id)
    assert info.error is not None and "str() raised ValueError" in info.error["message"]


async def test_a_user_step_name_cannot_collide_with_an_occurrence_key(fk: FlowKeeper) -> None:
    ran: list[str] = []

    @fk.workflow("collide")
    async def wf(ctx: Context) -> None:
        await ctx.step("sync", ran.append, "first")
        await ctx.step("sync", ran.append, "second")  # recorded as sync#2
        await ctx.step("sync#2", ran.append, "user's own")

    handle = await fk.trigger("collide")
    results = await finish(fk, handle.run_id)
    assert results[-1].outcome is Outcome.FAILED
    assert ran == ["first", "second"]
    info = await fk.get_run(handle.run_id)
    assert info.error is not None and info.error["type"] == "flowkeeper.errors.StepUsageError"
    assert "'#'" in info.error["message"]


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"note": "a\x00b"}, None),
        ({"x": float("nan")}, None),
        ({"x": [float("inf")]}, None),
        ({"s": "\ud800"}, None),
        ({"ok": 1}, "key\x00with-nul"),
        ({"ok": 1}, "key\udc80"),
        ({"ok": 1}, ""),
        ({"ok": 1}, "k" * 513),
    ],
    ids=["nul", "nan", "inf", "surrogate", "key-nul", "key-surrogate", "key-empty", "key-long"],
)
async def test_trigger_refuses_what_postgres_cannot_store_and_creates_nothing(
    fk: FlowKeeper, database_url: str, data: dict[str, Any], key: str | None
) -> None:
    @fk.workflow("takes")
    async def wf(ctx: Context, data: dict[str, Any]) -> None:
        return None

    with pytest.raises(InvalidInputError) as caught:
        await fk.trigger("takes", data, idempotency_key=key)
    assert "takes" in str(caught.value)
    assert await run_count(database_url) == 0
    handle = await fk.trigger("takes", {"fine": True}, idempotency_key="a-good-key")
    assert handle.created  # nothing else was disturbed


async def test_operator_reasons_with_nul_are_stored(fk: FlowKeeper) -> None:
    @fk.workflow("idle")
    async def wf(ctx: Context) -> None:
        await ctx.sleep("long", 3600)

    handle = await fk.trigger("idle")
    await finish_sleeping(fk, handle.run_id)
    assert await fk.cancel(handle.run_id, reason="typed \x00 by accident \ud83d")
    info = await fk.get_run(handle.run_id)
    assert info.events[-1].kind == "cancelled"
    assert info.events[-1].detail is not None
    assert "\\x00" in info.events[-1].detail["reason"]


async def finish_sleeping(fk: FlowKeeper, run_id: str) -> None:
    result = await fk.advance(run_id)
    assert isinstance(result, SegmentResult) and result.outcome is Outcome.SLEEPING


# Anything a step may return, hostile values included.
hostile_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities included
    | st.text(max_size=8)  # NUL and lone surrogates included
)
hostile_values = st.recursive(
    hostile_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=10,
)


def storable(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return "\x00" not in value and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return all(storable(v) for v in value)
    if isinstance(value, dict):
        return all(storable(k) and storable(v) for k, v in value.items())
    return True


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=hostile_values)
async def test_any_step_result_ends_the_run_in_one_invocation(fk: FlowKeeper, value: Any) -> None:
    box: dict[str, Any] = fk.__dict__.setdefault("_box", {})
    box["value"] = value
    if "any" not in fk.registry:

        def produce() -> Any:
            return box["value"]

        @fk.workflow("any")
        async def wf(ctx: Context) -> Any:
            return await ctx.step("produce", produce)

    handle = await fk.trigger("any")
    results = await finish(fk, handle.run_id, most=1)
    info = await fk.get_run(handle.run_id)
    if storable(value):
        assert results[-1].outcome is Outcome.COMPLETED, info.error
        assert info.output == value
    else:
        assert results[-1].outcome is Outcome.FAILED
        assert info.error is not None and info.error["type"] == "SerializationError"


async def test_serialization_error_is_a_type_error_users_can_catch(fk: FlowKeeper) -> None:
    def produce() -> float:
        return float("nan")

    seen: list[str] = []

    @fk.workflow("catches")
    async def wf(ctx: Context) -> str:
        try:
            await ctx.step("nan", produce)
        except Exception as exc:  # StepFailedError with the SerializationError's message
            seen.append(type(exc).__name__)
            raise NonRetriableError("gave up") from exc
        return "unreachable"

    handle = await fk.trigger("catches")
    await finish(fk, handle.run_id)
    assert seen == ["StepFailedError"]
    assert issubclass(SerializationError, TypeError)
