"""One step never runs twice at once: gathered ctx calls, sync timeouts, cancel then replay.

Each test records when every step body starts and ends (with a real
database, real leases and heartbeats) and checks that no two executions of
one step overlap, and that no recorded step body runs again.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from flowkeeper import (
    Context,
    FlowKeeper,
    RetryPolicy,
    RunStateError,
    StepTimeoutError,
)
from flowkeeper.engine import Outcome, SegmentResult
from flowkeeper.executor import StepExecutor

from ..helpers import KEY

NO_WAIT = RetryPolicy(max_attempts=2, initial_delay=0, jitter=0)


class Spans:
    """Start and end times of step bodies, by name (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: dict[str, list[list[float]]] = {}

    def start(self, name: str) -> list[float]:
        span = [time.monotonic(), float("inf")]
        with self.lock:
            self.spans.setdefault(name, []).append(span)
        return span

    def overlaps(self, name: str) -> int:
        spans = sorted(self.spans.get(name, []))
        return sum(1 for a, b in itertools.pairwise(spans) if b[0] < a[1])

    def count(self, name: str) -> int:
        return len(self.spans.get(name, []))


@pytest.fixture
async def fk(database_url: str) -> AsyncIterator[FlowKeeper]:
    # A short lease: the heartbeat (a third of it) notices cancellations quickly.
    instance = FlowKeeper(
        database_url, signing_key=KEY, lease=0.6, default_retry=NO_WAIT, max_step_threads=4
    )
    try:
        yield instance
    finally:
        await instance.aclose()


def overrunning(
    fk: FlowKeeper, spans: Spans, workflow: str, *, takes: float, timeout: float
) -> threading.Event:
    """Register ``workflow``: one sync step "overruns" that takes longer than its timeout.

    Its spans are recorded in ``spans``; the event is set when a body starts.
    """
    entered = threading.Event()

    def overruns() -> str:
        span = spans.start("overruns")
        entered.set()
        time.sleep(takes)
        span[1] = time.monotonic()
        return "late"

    @fk.workflow(workflow)
    async def wf(ctx: Context) -> str:
        return await ctx.step("overruns", overruns, timeout=timeout)

    return entered


async def finish(fk: FlowKeeper, run_id: str, *, most: int = 20) -> list[SegmentResult]:
    results: list[SegmentResult] = []
    for _ in range(most):
        result = await fk.advance(run_id)
        if isinstance(result, SegmentResult):
            results.append(result)
            if result.outcome in (Outcome.COMPLETED, Outcome.FAILED, Outcome.CANCELLED):
                return results
        await asyncio.sleep(0.02)
    raise AssertionError(f"run {run_id} did not end: {results}")


# asyncio.gather of ctx calls ------------------------------------------------------------
@pytest.mark.parametrize("position", ["first", "after-a-step", "after-a-sleep", "with-a-sleep"])
async def test_gathered_ctx_calls_run_each_body_once(fk: FlowKeeper, position: str) -> None:
    spans = Spans()

    async def body(name: str) -> str:
        span = spans.start(name)
        await asyncio.sleep(0.05)
        span[1] = time.monotonic()
        return name

    @fk.workflow("gather")
    async def wf(ctx: Context) -> list[Any]:
        if position == "after-a-step":
            await ctx.step("before", body, "before")
        if position == "after-a-sleep":
            await ctx.sleep("nap", timedelta(milliseconds=1))
        second = (
            ctx.sleep("in-gather", 0.2) if position == "with-a-sleep" else ctx.step("b", body, "b")
        )
        return list(await asyncio.gather(ctx.step("a", body, "a"), second))

    handle = await fk.trigger("gather")
    results = await finish(fk, handle.run_id)
    assert results[-1].outcome is Outcome.COMPLETED
    assert spans.count("a") == 1 and spans.overlaps("a") == 0
    info = await fk.get_run(handle.run_id)
    expected = ["a", None] if position == "with-a-sleep" else ["a", "b"]
    assert info.output == expected
    keys = sorted(s.key for s in info.steps if s.kind == "step")
    assert keys == sorted(
        (["before"] if position == "after-a-step" else [])
        + ["a"]
        + ([] if position == "with-a-sleep" else ["b"])
    )


async def test_a_ctx_call_inside_a_step_is_refused(fk: FlowKeeper) -> None:
    holder: dict[str, Context] = {}

    async def outer() -> int:
        return await holder["ctx"].step("inner", lambda: 1)

    @fk.workflow("nested")
    async def wf(ctx: Context) -> None:
        holder["ctx"] = ctx
        await ctx.step("outer", outer)

    handle = await fk.trigger("nested")
    results = await finish(fk, handle.run_id)
    assert results[-1].outcome is Outcome.FAILED
    info = await fk.get_run(handle.run_id)
    assert info.error is not None and "StepUsageError" in info.error["type"]


# sync timeouts ------------------------------------------------------------------------------
async def test_a_timed_out_sync_attempt_never_overlaps_its_retry(fk: FlowKeeper) -> None:
    spans = Spans()
    effects: list[str] = []

    def slow(tag: str) -> str:
        span = spans.start("slow")
        time.sleep(0.8)
        effects.append(tag)  # the side effect of the attempt, landing late
        span[1] = time.monotonic()
        return tag

    @fk.workflow("slow")
    async def wf(ctx: Context) -> str:
        return await ctx.step("slow", slow, "effect", timeout=0.1)

    handle = await fk.trigger("slow")
    results = await finish(fk, handle.run_id)
    assert results[-1].outcome is Outcome.FAILED
    assert spans.count("slow") == 2  # max_attempts
    assert spans.overlaps("slow") == 0
    assert effects == ["effect", "effect"]  # both attempts ended before the run did
    info = await fk.get_run(handle.run_id)
    assert info.error is not None and "timeout of 0.1s" in info.error["message"]
    hung = [e for e in info.events if e.kind == "step_hung"]
    assert [e.attempt for e in hung] == [1, 2]


async def test_hung_sync_steps_do_not_starve_other_runs(fk: FlowKeeper) -> None:
    release = threading.Event()

    def hang() -> None:
        release.wait(20)

    def quick() -> str:
        return "ok"

    @fk.workflow("hangs")
    async def hangs(ctx: Context) -> None:
        await ctx.step("hang", hang, timeout=0.05, retry=RetryPolicy.none())

    @fk.workflow("quick")
    async def quick_wf(ctx: Context) -> str:
        return await ctx.step("quick", quick, timeout=5)

    hung = [await fk.trigger("hangs") for _ in range(8)]  # twice the 4 step threads
    tasks = [asyncio.create_task(fk.advance(h.run_id)) for h in hung]
    await asyncio.sleep(0.5)
    assert fk.engine.executor.abandoned >= 4
    other = await fk.trigger("quick")
    started = time.monotonic()
    result = await fk.advance(other.run_id)
    assert isinstance(result, SegmentResult) and result.outcome is Outcome.COMPLETED
    assert time.monotonic() - started < 3
    release.set()
    outcomes = [r.outcome for r in await asyncio.gather(*tasks) if isinstance(r, SegmentResult)]
    assert outcomes == [Outcome.FAILED] * 8


def test_the_step_executor_replaces_abandoned_threads_up_to_a_cap() -> None:
    executor = StepExecutor(2, max_abandoned=3)
    gate = threading.Event()

    def running(futures: list[Any]) -> None:
        deadline = time.monotonic() + 5
        while not all(f.running() for f in futures) and time.monotonic() < deadline:
            time.sleep(0.005)

    hung = [executor.submit(lambda: gate.wait(10)) for _ in range(2)]
    running(hung)
    for f in hung:
        assert executor.abandon(f)
    assert executor.abandoned == 2
    assert executor.submit(lambda: 42).result(timeout=5) == 42  # a fresh thread took the place
    more = [executor.submit(lambda: gate.wait(10)) for _ in range(2)]
    running(more)
    for f in more:
        assert executor.abandon(f)
    waiting = executor.submit(lambda: "after")
    time.sleep(0.2)
    assert not waiting.done()  # over the cap of abandoned threads: it waits for one to end
    gate.set()
    assert waiting.result(timeout=5) == "after"
    deadline = time.monotonic() + 5
    while executor.abandoned and time.monotonic() < deadline:
        time.sleep(0.01)
    assert executor.abandoned == 0  # each abandoned thread ended with its function


async def test_an_async_step_timeout_is_its_own_not_the_steps(fk: FlowKeeper) -> None:
    async def raises_timeout() -> None:
        raise TimeoutError("the step's own")

    @fk.workflow("own-timeout")
    async def wf(ctx: Context) -> None:
        await ctx.step("own", raises_timeout, timeout=30, retry=RetryPolicy.none())

    handle = await fk.trigger("own-timeout")
    await finish(fk, handle.run_id)
    info = await fk.get_run(handle.run_id)
    assert info.error is not None and info.error["type"] == "TimeoutError"
    assert not issubclass(TimeoutError, StepTimeoutError)


# cancel and replay while a step runs ---------------------------------------------------------
async def test_cancel_cancels_an_async_step_and_replay_then_runs_it_alone(fk: FlowKeeper) -> None:
    spans = Spans()
    cancelled = asyncio.Event()
    first = asyncio.Event()

    async def long_step() -> str:
        span = spans.start("long")
        try:
            if not first.is_set():
                first.set()
                await asyncio.sleep(30)
            return "done"
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finally:
            span[1] = time.monotonic()

    @fk.workflow("long")
    async def wf(ctx: Context) -> str:
        return await ctx.step("long", long_step)

    handle = await fk.trigger("long")
    task = asyncio.create_task(fk.advance(handle.run_id))
    await asyncio.wait_for(first.wait(), 5)
    assert await fk.cancel(handle.run_id, reason="operator")
    await asyncio.wait_for(cancelled.wait(), 5)  # within a heartbeat
    result = await asyncio.wait_for(task, 5)
    assert isinstance(result, SegmentResult) and result.outcome is Outcome.CANCELLED
    info = await fk.get_run(handle.run_id)
    assert info.status == "cancelled" and info.due_at is None
    assert [e.kind for e in info.events][-2:] == ["cancelled", "stopped"]
    await fk.replay(handle.run_id)
    results = await finish(fk, handle.run_id)
    assert results[-1].outcome is Outcome.COMPLETED
    assert spans.count("long") == 2 and spans.overlaps("long") == 0


async def test_replay_is_refused_until_a_cancelled_sync_step_returns(fk: FlowKeeper) -> None:
    spans = Spans()
    entered = threading.Event()
    release = threading.Event()

    def blocking() -> str:
        span = spans.start("blocking")
        if not entered.is_set():
            entered.set()
            release.wait(20)
        span[1] = time.monotonic()
        return "done"

    @fk.workflow("blocking")
    async def wf(ctx: Context) -> str:
        return await ctx.step("blocking", blocking)

    handle = await fk.trigger("blocking")
    task = asyncio.create_task(fk.advance(handle.run_id))
    await asyncio.to_thread(entered.wait, 5)
    assert await fk.cancel(handle.run_id)
    # Its invocation holds on (the heartbeat keeps the lease) while the thread runs.
    for _ in range(3):
        await asyncio.sleep(0.7)  # longer than the lease
        with pytest.raises(RunStateError, match="has not stopped yet"):
            await fk.replay(handle.run_id)
        with pytest.raises(RunStateError):
            await fk.retry(handle.run_id)
    release.set()
    result = await asyncio.wait_for(task, 5)
    assert isinstance(result, SegmentResult) and result.outcome is Outcome.CANCELLED
    await fk.replay(handle.run_id)
    results = await finish(fk, handle.run_id)
    assert results[-1].outcome is Outcome.COMPLETED
    assert spans.count("blocking") == 2 and spans.overlaps("blocking") == 0
    info = await fk.get_run(handle.run_id)
    stopped = [e for e in info.events if e.kind == "stopped"]
    assert stopped and stopped[0].detail is not None
    assert stopped[0].detail["how"] == "waited for its thread to return"


async def test_cancel_between_steps_stops_before_the_next(fk: FlowKeeper) -> None:
    ran: list[str] = []
    gate = asyncio.Event()

    async def one() -> None:
        ran.append("one")
        gate.set()
        await asyncio.sleep(0.5)  # the cancel lands while this runs, then it returns

    @fk.workflow("two-steps")
    async def wf(ctx: Context) -> None:
        await ctx.step("one", one)
        await ctx.step("two", ran.append, "two")

    handle = await fk.trigger("two-steps")
    task = asyncio.create_task(fk.advance(handle.run_id))
    await gate.wait()
    assert await fk.cancel(handle.run_id)
    result = await task
    assert isinstance(result, SegmentResult) and result.outcome is Outcome.CANCELLED
    assert "two" not in ran
    info = await fk.get_run(handle.run_id)
    assert info.status == "cancelled"


async def test_a_cancelled_runs_dead_holder_is_let_go_when_its_lease_expires(
    fk: FlowKeeper, database_url: str
) -> None:
    import asyncpg

    @fk.workflow("sleeper")
    async def wf(ctx: Context) -> None:
        await ctx.step("s", lambda: 1)

    handle = await fk.trigger("sleeper")
    conn = await asyncpg.connect(database_url)
    try:
        # As if an invocation had claimed the run and died inside its step.
        await conn.execute(
            "UPDATE flowkeeper.runs SET status = 'running', executing = true, "
            "lease_token = gen_random_uuid(), due_at = now() + interval '0.5 seconds' "
            "WHERE id = $1",
            handle.run_id,
        )
        assert await fk.cancel(handle.run_id)
        with pytest.raises(RunStateError):
            await fk.replay(handle.run_id)

        await asyncio.sleep(0.6)
        await fk.replay(handle.run_id)  # the lease is over: nobody holds it
        results = await finish(fk, handle.run_id)
        assert results[-1].outcome is Outcome.COMPLETED
        # The stale due time of the cancelled run was not left for ticks to find.
        assert (
            await conn.fetchval("SELECT count(*) FROM flowkeeper.runs WHERE due_at IS NOT NULL")
            == 0
        )
    finally:
        await conn.close()


async def test_sync_steps_see_the_callers_context_variables(fk: FlowKeeper) -> None:
    import contextvars

    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    seen: list[str] = []

    def step() -> None:
        seen.append(request_id.get("missing"))

    @fk.workflow("ctxvars")
    async def wf(ctx: Context) -> None:
        request_id.set(f"run-{ctx.run_id}")
        await ctx.step("s", step)

    handle = await fk.trigger("ctxvars")
    await finish(fk, handle.run_id)
    assert seen == [f"run-{handle.run_id}"]


async def test_a_cancel_landing_before_a_sync_timeout_holds_the_run_until_the_thread_returns(
    fk: FlowKeeper,
) -> None:
    # The cancel reaches the database before the step's timeout, and the
    # heartbeat (every lease/3) has not seen it yet: the timeout's own write is
    # the first to be refused.  The run must stay held until the thread returns.
    spans = Spans()
    entered = overrunning(fk, spans, "overruns", takes=0.8, timeout=0.05)
    handle = await fk.trigger("overruns")
    task = asyncio.create_task(fk.advance(handle.run_id))
    await asyncio.to_thread(entered.wait, 5)
    assert await fk.cancel(handle.run_id)
    await asyncio.sleep(0.15)  # past the timeout, before the thread returns
    with pytest.raises(RunStateError, match="has not stopped yet"):
        await fk.replay(handle.run_id)
    result = await asyncio.wait_for(task, 5)
    assert isinstance(result, SegmentResult) and result.outcome is Outcome.CANCELLED
    await fk.replay(handle.run_id)
    await finish(fk, handle.run_id)
    assert spans.count("overruns") == 3  # the cancelled attempt, then two after the replay
    assert spans.overlaps("overruns") == 0


async def test_a_host_cancelling_the_invocation_keeps_the_lease_while_the_thread_runs(
    fk: FlowKeeper,
) -> None:
    spans = Spans()
    entered = threading.Event()
    release = threading.Event()

    def blocking() -> str:
        span = spans.start("blocking")
        entered.set()
        release.wait(10)
        span[1] = time.monotonic()
        return "done"

    @fk.workflow("host-cancel")
    async def wf(ctx: Context) -> str:
        return await ctx.step("blocking", blocking)

    handle = await fk.trigger("host-cancel")
    task = asyncio.create_task(fk.advance(handle.run_id))
    await asyncio.to_thread(entered.wait, 5)
    task.cancel()  # as a server shutting down cancels its requests
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(1.0)  # well past the 0.6 s lease
    refused = await fk.advance(handle.run_id)
    assert not isinstance(refused, SegmentResult)  # still held: nobody may start the step
    release.set()
    await asyncio.sleep(0.8)  # the lease, no longer renewed, runs out
    results = await finish(fk, handle.run_id)
    assert results[-1].outcome is Outcome.COMPLETED
    assert spans.count("blocking") == 2 and spans.overlaps("blocking") == 0
    info = await fk.get_run(handle.run_id)
    assert [a.error_type for a in info.steps[0].failed_attempts] == [
        "flowkeeper.errors.AttemptLostError"
    ]


async def test_a_cancel_landing_while_the_timeout_is_being_reported_still_waits_for_the_thread(
    fk: FlowKeeper, database_url: str
) -> None:
    # The sync step overruns its timeout; the write that reports it is held up
    # (a test transaction locks the steps table), and meanwhile the run is
    # cancelled and the heartbeat interrupts the step body in that write.  The
    # body must still wait for its thread before the run is let go of: a
    # replay must be refused until the thread has returned.
    import asyncpg

    spans = Spans()
    entered = overrunning(fk, spans, "overruns-reported", takes=1.5, timeout=0.3)
    handle = await fk.trigger("overruns-reported")
    locker = await asyncpg.connect(database_url)
    try:
        task = asyncio.create_task(fk.advance(handle.run_id))
        await asyncio.to_thread(entered.wait, 5)
        lock = locker.transaction()
        await lock.start()
        await locker.execute("LOCK TABLE flowkeeper.steps IN SHARE MODE")
        for _ in range(100):  # until the timeout's report waits for the lock
            if await locker.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the timeout's report never waited for the lock")
        assert await fk.cancel(handle.run_id)
        await asyncio.sleep(0.4)  # the heartbeat (lease/3) sees the cancel mid-write
        await lock.commit()
        await asyncio.sleep(0.1)
        assert spans.spans["overruns"][0][1] == float("inf")  # the thread still runs
        with pytest.raises(RunStateError, match="has not stopped yet"):
            await fk.replay(handle.run_id)
        result = await asyncio.wait_for(task, 5)
        assert isinstance(result, SegmentResult) and result.outcome is Outcome.CANCELLED
        assert spans.spans["overruns"][0][1] != float("inf")
    finally:
        await locker.close()
    await fk.replay(handle.run_id)
    await finish(fk, handle.run_id)
    assert spans.overlaps("overruns") == 0


async def test_a_refused_write_fails_the_run_only_once_a_sibling_thread_returned(
    fk: FlowKeeper, database_url: str
) -> None:
    # A gathered sibling's result is refused by Postgres for good (here a
    # trigger raising a data exception, as a value Postgres cannot store
    # would): the run fails, but only once the other branch's sync step has
    # returned, or a replay of the failed run could start it beside itself.
    import asyncpg

    spans = Spans()
    entered = threading.Event()

    def blocking() -> str:
        span = spans.start("blocking")
        entered.set()
        time.sleep(1.2)
        span[1] = time.monotonic()
        return "done"

    async def refused() -> str:
        await asyncio.to_thread(entered.wait, 5)
        return "refused"

    @fk.workflow("refused-sibling")
    async def wf(ctx: Context) -> list[str]:
        return list(
            await asyncio.gather(ctx.step("blocking", blocking), ctx.step("refused", refused))
        )

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            CREATE FUNCTION refuse_step() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.key = 'refused' THEN
                    RAISE EXCEPTION 'refused by the test' USING ERRCODE = '22023';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_step BEFORE INSERT OR UPDATE ON flowkeeper.steps
            FOR EACH ROW EXECUTE FUNCTION refuse_step();
            """
        )
        handle = await fk.trigger("refused-sibling")
        task = asyncio.create_task(fk.advance(handle.run_id))
        await asyncio.to_thread(entered.wait, 5)
        await asyncio.sleep(0.5)  # the sibling's write has been refused by now
        assert spans.spans["blocking"][0][1] == float("inf")  # the thread still runs
        with pytest.raises(RunStateError):
            await fk.replay(handle.run_id)
        result = await asyncio.wait_for(task, 5)
        assert isinstance(result, SegmentResult) and result.outcome is Outcome.FAILED
        assert result.error is not None and "refused by the test" in result.error["message"]
        assert spans.spans["blocking"][0][1] != float("inf")
        await conn.execute("DROP TRIGGER refuse_step ON flowkeeper.steps")
    finally:
        await conn.close()
    await fk.replay(handle.run_id)
    results = await finish(fk, handle.run_id)
    assert results[-1].outcome is Outcome.COMPLETED
    assert spans.count("blocking") == 2 and spans.overlaps("blocking") == 0
