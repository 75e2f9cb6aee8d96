"""Parallel steps in one invocation: asyncio.gather, ctx.parallel, ctx.map.

Real PostgreSQL, real uvicorn over loopback (trigger pushes, the tick
re-dispatches).  Each test counts step bodies, so a branch run twice or a
recorded branch re-executed fails it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flowkeeper import Context, FlowKeeper, RetryPolicy, StepFailedError
from flowkeeper.engine import SegmentResult

from ..helpers import drive, make_fk, serve

NO_RETRY = RetryPolicy(max_attempts=1)
FAST = RetryPolicy(max_attempts=4, initial_delay=0.05, backoff=1, jitter=0)


@pytest.fixture
async def fk(database_url: str) -> AsyncIterator[FlowKeeper]:
    instance = make_fk(database_url, lease=2, max_parallel_steps=64)
    try:
        yield instance
    finally:
        await instance.aclose()


class Gauge:
    """How many bodies run at once (the maximum observed), and each body's count."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()

    async def io(self, tag: str, seconds: float = 0.05) -> str:
        with self.lock:
            self.calls[tag] += 1
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(seconds)
        finally:
            with self.lock:
                self.now -= 1
        return tag


@pytest.mark.parametrize("width", [2, 50])
async def test_gather_runs_branches_concurrently_once_each(fk: FlowKeeper, width: int) -> None:
    gauge = Gauge()

    @fk.workflow("fan")
    async def fan(ctx: Context) -> list[str]:
        results = await asyncio.gather(
            *(ctx.step(f"io:{i}", gauge.io, f"t{i}", 0.2) for i in range(width))
        )
        return list(results)

    async with serve(fk):
        started = time.monotonic()
        handle = await fk.trigger("fan")
        assert (await drive(fk, [handle.run_id]))[handle.run_id] == "completed"
        elapsed = time.monotonic() - started
    info = await fk.get_run(handle.run_id)
    assert info.output == [f"t{i}" for i in range(width)]
    assert all(count == 1 for count in gauge.calls.values()) and len(gauge.calls) == width
    assert gauge.most == width  # really concurrent, not one after another
    assert elapsed < 0.2 * width or width == 2
    assert info.invocations == 1


async def test_map_respects_max_concurrency_and_the_process_bound(database_url: str) -> None:
    fk = make_fk(database_url, max_parallel_steps=5)
    gauge = Gauge()

    @fk.workflow("mapped")
    async def mapped(ctx: Context) -> dict[str, Any]:
        limited = await ctx.map("score", gauge.io, [f"a{i}" for i in range(12)], max_concurrency=3)
        first = gauge.most
        gauge.most = 0
        bounded = await asyncio.gather(*(ctx.step(f"g:{i}", gauge.io, f"b{i}") for i in range(20)))
        return {"limited": limited, "first": first, "second": gauge.most, "n": len(bounded)}

    try:
        async with serve(fk):
            handle = await fk.trigger("mapped")
            assert (await drive(fk, [handle.run_id]))[handle.run_id] == "completed"
        info = await fk.get_run(handle.run_id)
        assert info.output == {
            "limited": [f"a{i}" for i in range(12)],
            "first": 3,
            "second": 5,
            "n": 20,
        }
        assert [s.key for s in info.steps][:12] == [f"score[{i}]" for i in range(12)]
    finally:
        await fk.aclose()


async def test_a_failing_branch_lets_running_ones_finish_then_fails_the_run(
    fk: FlowKeeper,
) -> None:
    gauge = Gauge()

    async def score(item: int) -> int:
        await gauge.io(f"i{item}", 0.05 if item != 3 else 0.01)
        if item == 3:
            raise ValueError(f"item {item} is poison")
        return item * 10

    @fk.workflow("scores")
    async def scores(ctx: Context) -> list[int]:
        return await ctx.map("score", score, range(10), max_concurrency=4, retry=NO_RETRY)

    async with serve(fk):
        handle = await fk.trigger("scores")
        assert (await drive(fk, [handle.run_id]))[handle.run_id] == "failed"
    info = await fk.get_run(handle.run_id)
    assert info.error is not None and info.error["step"] == "score[3]"
    assert "poison" in info.error["message"]
    steps = {s.key: s for s in info.steps}
    # The four running when item 3 failed all finished and were recorded; none started after.
    assert set(steps) == {"score[0]", "score[1]", "score[2]", "score[3]"}
    assert [steps[f"score[{i}]"].status for i in range(3)] == ["completed"] * 3
    assert sum(gauge.calls.values()) == 4


async def test_return_exceptions_hands_each_failure_back(fk: FlowKeeper) -> None:
    async def maybe(item: int) -> int:
        if item % 2:
            raise KeyError(item)
        return item

    @fk.workflow("mixed")
    async def mixed(ctx: Context) -> list[str]:
        out = await ctx.map("m", maybe, range(4), retry=NO_RETRY, return_exceptions=True)
        return [type(v).__name__ if isinstance(v, BaseException) else str(v) for v in out]

    async with serve(fk):
        handle = await fk.trigger("mixed")
        await drive(fk, [handle.run_id])
    info = await fk.get_run(handle.run_id)
    assert info.output == ["0", "StepFailedError", "2", "StepFailedError"]


async def test_branches_retry_on_their_own_and_keep_their_attempts(fk: FlowKeeper) -> None:
    attempts: Counter[str] = Counter()

    async def flaky(tag: str, failures: int) -> str:
        attempts[tag] += 1
        if attempts[tag] <= failures:
            raise RuntimeError(f"{tag} attempt {attempts[tag]}")
        return tag

    def slow_sync(tag: str) -> str:  # a sync branch, in flowkeeper's own threads
        attempts[tag] += 1
        time.sleep(0.3)
        return tag

    @fk.workflow("retries")
    async def retries(ctx: Context) -> list[Any]:
        # "a" retries inside the invocation while "slow" runs; then both
        # "late" branches wait on backoffs at once, so the run suspends
        # (status retrying) and a later invocation goes on.
        first = await asyncio.gather(
            ctx.step("a", flaky, "a", 2, retry=FAST),
            ctx.step("slow", slow_sync, "slow", timeout=5),
        )
        late = RetryPolicy(max_attempts=3, initial_delay=0.4, backoff=1, jitter=0)
        second = await ctx.parallel(
            ctx.step("b", flaky, "b", 1, retry=late), ctx.step("c", flaky, "c", 2, retry=late)
        )
        return [*first, *second]

    async with serve(fk):
        handle = await fk.trigger("retries")
        assert (await drive(fk, [handle.run_id]))[handle.run_id] == "completed"
    info = await fk.get_run(handle.run_id)
    assert info.output == ["a", "slow", "b", "c"]
    assert attempts == {"a": 3, "slow": 1, "b": 2, "c": 3}
    steps = {s.key: s for s in info.steps}
    assert {k: (s.status, s.attempts) for k, s in steps.items()} == {
        "a": ("completed", 3),
        "slow": ("completed", 1),
        "b": ("completed", 2),
        "c": ("completed", 3),
    }
    assert info.invocations >= 2  # the run suspended while both late branches backed off
    failed = [e for e in info.events if e.kind == "attempt_failed"]
    assert Counter(e.step_key for e in failed) == {"a": 2, "b": 1, "c": 2}


async def test_a_branch_timeout_fails_only_that_branch(fk: FlowKeeper) -> None:
    async def hang() -> None:
        await asyncio.sleep(30)

    @fk.workflow("timeouts")
    async def timeouts(ctx: Context) -> list[str]:
        out = await ctx.parallel(
            ctx.step("hang", hang, timeout=0.2, retry=NO_RETRY),
            ctx.step("ok", asyncio.sleep, 0.05, "fine"),
            return_exceptions=True,
        )
        return [type(v).__name__ if isinstance(v, BaseException) else str(v) for v in out]

    async with serve(fk):
        handle = await fk.trigger("timeouts")
        await drive(fk, [handle.run_id])
    info = await fk.get_run(handle.run_id)
    assert info.output == ["StepFailedError", "fine"]
    hung = next(s for s in info.steps if s.key == "hang")
    assert hung.error is not None and "StepTimeoutError" in hung.error["type"]


async def test_a_wait_inside_branches_is_refused_before_any_body_starts(fk: FlowKeeper) -> None:
    gauge = Gauge()

    @fk.workflow("waity")
    async def waity(ctx: Context) -> None:
        await asyncio.gather(
            ctx.step("work", gauge.io, "work"), ctx.wait_for_event("approval", event="approved")
        )

    async with serve(fk):
        handle = await fk.trigger("waity")
        assert (await drive(fk, [handle.run_id]))[handle.run_id] == "failed"
    info = await fk.get_run(handle.run_id)
    assert info.error is not None and info.error["type"] == "flowkeeper.errors.StepUsageError"
    assert "concurrent branches" in info.error["message"]
    assert not gauge.calls  # refused before the sibling's body started


async def test_ctx_from_a_thread_or_an_outliving_task_is_refused(fk: FlowKeeper) -> None:
    seen: list[str] = []

    @fk.workflow("thready")
    async def thready(ctx: Context) -> None:
        def in_thread() -> None:
            try:
                asyncio.run(ctx.step("from-thread", lambda: 1))
            except Exception as exc:
                seen.append(str(exc))

        await asyncio.to_thread(in_thread)

    @fk.workflow("orphan")
    async def orphan(ctx: Context) -> str:
        async def late() -> None:
            await asyncio.sleep(0.05)
            try:
                await ctx.step("late", lambda: 1)
            except Exception as exc:
                seen.append(str(exc))

        asyncio.get_running_loop().create_task(late())
        return "done"

    async with serve(fk):
        a = await fk.trigger("thready")
        b = await fk.trigger("orphan")
        statuses = await drive(fk, [a.run_id, b.run_id])
        await asyncio.sleep(0.2)
    assert statuses == {a.run_id: "failed", b.run_id: "completed"}
    info = await fk.get_run(a.run_id)
    assert info.error is not None and "another thread" in info.error["message"]
    assert any("another thread" in m for m in seen)
    assert any("after the workflow function returned" in m for m in seen)
    assert [s.key for s in (await fk.get_run(b.run_id)).steps] == []


async def test_gather_failure_is_the_step_error_and_siblings_are_recorded(fk: FlowKeeper) -> None:
    gauge = Gauge()

    async def boom() -> None:
        raise ValueError("boom")

    @fk.workflow("gfail")
    async def gfail(ctx: Context) -> str:
        try:
            await asyncio.gather(
                ctx.step("boom", boom, retry=NO_RETRY), ctx.step("x", gauge.io, "x")
            )
        except StepFailedError as exc:
            await asyncio.sleep(0.1)  # the sibling keeps running and is recorded
            return f"{exc.step}:{exc.error_type}"
        return "no error"

    async with serve(fk):
        handle = await fk.trigger("gfail")
        await drive(fk, [handle.run_id])
    info = await fk.get_run(handle.run_id)
    assert info.output == "boom:ValueError"
    assert {s.key: s.status for s in info.steps} == {"boom": "failed", "x": "completed"}


async def test_the_time_budget_hands_branches_on_without_running_any_twice(
    database_url: str,
) -> None:
    fk = make_fk(database_url, max_parallel_steps=3)
    gauge = Gauge()

    @fk.workflow("budget")
    async def budget(ctx: Context) -> list[str]:
        return list(
            await asyncio.gather(*(ctx.step(f"s{i}", gauge.io, f"s{i}", 0.1) for i in range(12)))
        )

    try:
        handle = await fk.trigger("budget")
        outcomes = []
        lease: str | None = None
        for _ in range(20):
            result = await fk.advance(handle.run_id, lease, time_budget=0.25)
            assert isinstance(result, SegmentResult), result
            outcomes.append(result.outcome)
            if result.outcome == "completed":
                break
            # The continuation a hand-off pushes carries its fresh token.
            lease = str(result.handoff_token) if result.handoff_token else None
        info = await fk.get_run(handle.run_id)
    finally:
        await fk.aclose()
    assert info.output == [f"s{i}" for i in range(12)]
    assert "handoff" in outcomes and outcomes[-1] == "completed"
    assert gauge.calls == {f"s{i}": 1 for i in range(12)}
    assert gauge.most <= 3
