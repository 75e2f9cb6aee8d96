"""The core promise end to end: trigger, execute through a real uvicorn, resume."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from pydantic import BaseModel

from flowkeeper import (
    Context,
    FlowKeeper,
    InvalidInputError,
    NonRetriableError,
    RetryAfterError,
    RetryPolicy,
    RunCancelledError,
    RunFailedError,
    RunTimeoutError,
    StepFailedError,
    UnknownWorkflowError,
    define_workflow,
)
from flowkeeper.testing import FakeClock

from ..helpers import drive, make_fk, serve, wait_for

FAST_RETRY = RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0)


class Order(BaseModel):
    id: str
    amount: int


class Charge(BaseModel):
    charge_id: str
    amount: int


async def test_checkout_runs_to_completion_in_one_invocation(fk: FlowKeeper) -> None:
    calls: Counter[str] = Counter()

    async def charge_card(order: Order) -> Charge:
        calls["charge"] += 1
        return Charge(charge_id=f"ch_{order.id}", amount=order.amount)

    def send_receipt(order: Order, charge: Charge) -> dict[str, str]:  # sync: runs in a thread
        calls["receipt"] += 1
        assert isinstance(charge, Charge)
        return {"to": order.id, "charge": charge.charge_id}

    @fk.workflow("checkout")
    async def checkout(ctx: Context, order: Order) -> dict[str, str]:
        charge = await ctx.step("charge-card", charge_card, order)
        receipt = await ctx.step("send-receipt", send_receipt, order, charge)
        return {"charge": charge.charge_id, "receipt_to": receipt["to"]}

    async with serve(fk):
        handle = await fk.trigger("checkout", Order(id="o1", amount=250))
        assert handle.created
        output = await fk.result(handle.run_id, timeout=10)
    assert output == {"charge": "ch_o1", "receipt_to": "o1"}
    assert calls == {"charge": 1, "receipt": 1}
    info = await fk.get_run(handle.run_id)
    assert info.status == "completed"
    assert info.invocations == 1
    assert info.input == {"id": "o1", "amount": 250}
    assert [(s.key, s.status, s.attempts) for s in info.steps] == [
        ("charge-card", "completed", 1),
        ("send-receipt", "completed", 1),
    ]
    assert info.steps[0].output == {"charge_id": "ch_o1", "amount": 250}
    assert info.steps[0].input == {"args": [{"id": "o1", "amount": 250}], "kwargs": {}}


async def test_bad_input_is_refused_and_creates_no_run(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    @fk.workflow("checkout")
    async def checkout(ctx: Context, order: Order) -> None:
        return None

    with pytest.raises(InvalidInputError) as err:
        await fk.trigger("checkout", {"id": "o1", "amount": "a lot"})
    assert "amount" in str(err.value)
    assert "no run was created" in str(err.value)
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == 0


async def test_unknown_workflow_at_trigger(fk: FlowKeeper) -> None:
    with pytest.raises(UnknownWorkflowError, match="Import the module"):
        await fk.trigger("nope", {})


async def test_idempotency_key_returns_the_first_run(fk: FlowKeeper) -> None:
    @fk.workflow("w")
    async def w(ctx: Context, n: int) -> int:
        return n

    first = await fk.trigger("w", 1, idempotency_key="order-7")
    second = await fk.trigger("w", 2, idempotency_key="order-7")
    other = await fk.trigger("w", 3, idempotency_key="order-8")
    assert second.run_id == first.run_id
    assert not second.created
    assert other.run_id != first.run_id
    # Unique per workflow: the same key on another workflow is another run.

    @fk.workflow("v")
    async def v(ctx: Context, n: int) -> int:
        return n

    assert (await fk.trigger("v", 1, idempotency_key="order-7")).run_id != first.run_id


async def test_retry_with_backoff_then_success(fk: FlowKeeper) -> None:
    attempts: list[datetime] = []

    async def flaky() -> str:
        attempts.append(datetime.now(UTC))
        if len(attempts) < 3:
            raise ConnectionError(f"network flaked ({len(attempts)})")
        return "ok"

    @fk.workflow("flaky", retry=RetryPolicy(max_attempts=5, initial_delay=0.2, jitter=0))
    async def flaky_wf(ctx: Context) -> str:
        return await ctx.step("call", flaky)

    async with serve(fk):
        handle = await fk.trigger("flaky")
        statuses = await drive(fk, [handle.run_id], interval=0.02)
    assert statuses[handle.run_id] == "completed"
    assert len(attempts) == 3
    # Exponential: the second wait is about twice the first.
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.2
    assert gaps[1] >= 0.4
    info = await fk.get_run(handle.run_id)
    step = info.steps[0]
    assert step.attempts == 3
    assert [a.message for a in step.failed_attempts] == ["network flaked (1)", "network flaked (2)"]
    assert all(a.error_type == "ConnectionError" for a in step.failed_attempts)


async def test_exhausted_retries_fail_the_run_with_type_message_traceback(fk: FlowKeeper) -> None:
    def always_fails() -> None:
        raise ValueError("card declined")

    @fk.workflow("doomed", retry=FAST_RETRY)
    async def doomed(ctx: Context) -> None:
        await ctx.step("charge", always_fails)

    async with serve(fk):
        handle = await fk.trigger("doomed")
        await drive(fk, [handle.run_id], interval=0.02)
        with pytest.raises(RunFailedError) as err:
            await fk.result(handle.run_id, timeout=1)
    assert err.value.error_type == "ValueError"
    assert err.value.error_message == "card declined"
    info = await fk.get_run(handle.run_id)
    assert info.status == "failed"
    assert info.error is not None
    assert info.error["step"] == "charge"
    assert "always_fails" in info.error["traceback"]
    # The traceback starts in user code, not in flowkeeper's or asyncio's plumbing.
    assert "flowkeeper/engine.py" not in info.error["traceback"]
    assert "concurrent/futures" not in info.error["traceback"]
    assert info.steps[0].status == "failed"
    assert info.steps[0].attempts == 3
    assert len(info.steps[0].failed_attempts) == 3


async def test_non_retriable_error_fails_at_once(fk: FlowKeeper) -> None:
    calls = 0

    def declined() -> None:
        nonlocal calls
        calls += 1
        raise NonRetriableError("card declined: stolen")

    @fk.workflow("w")
    async def w(ctx: Context) -> None:
        await ctx.step("charge", declined)

    async with serve(fk):
        handle = await fk.trigger("w")
        await drive(fk, [handle.run_id])
    info = await fk.get_run(handle.run_id)
    assert info.status == "failed"
    assert calls == 1
    assert info.error is not None
    assert info.error["type"] == "flowkeeper.errors.NonRetriableError"


async def test_step_failure_can_be_caught_deterministically(fk: FlowKeeper) -> None:
    refunds = 0

    def charge() -> None:
        raise NonRetriableError("declined")

    def refund() -> str:
        nonlocal refunds
        refunds += 1
        return "refunded"

    @fk.workflow("saga")
    async def saga(ctx: Context) -> str:
        try:
            await ctx.step("charge", charge)
        except StepFailedError as exc:
            assert exc.step == "charge"
            await ctx.step("refund", refund)
            await ctx.sleep("pause", 0.2)  # forces a replay of the failed step
            return f"compensated: {exc.message}"
        return "charged"

    async with serve(fk):
        handle = await fk.trigger("saga")
        await drive(fk, [handle.run_id], interval=0.05)
        assert await fk.result(handle.run_id) == "compensated: declined"
    assert refunds == 1


async def test_retry_after_delay_is_honoured(fk: FlowKeeper) -> None:
    times: list[float] = []

    async def rate_limited() -> str:
        times.append(asyncio.get_running_loop().time())
        if len(times) == 1:
            raise RetryAfterError("429", delay=0.6)
        return "ok"

    @fk.workflow("w", retry=RetryPolicy(initial_delay=0.01, jitter=0))
    async def w(ctx: Context) -> str:
        return await ctx.step("api", rate_limited)

    async with serve(fk):
        handle = await fk.trigger("w")
        await drive(fk, [handle.run_id], interval=0.02)
    assert times[1] - times[0] >= 0.6


async def test_step_timeout_counts_as_a_failed_attempt(fk: FlowKeeper) -> None:
    calls = 0

    async def slow() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(5)
        return "fast now"

    @fk.workflow("w", retry=FAST_RETRY)
    async def w(ctx: Context) -> str:
        return await ctx.step("slow", slow, timeout=0.2)

    async with serve(fk):
        handle = await fk.trigger("w")
        await drive(fk, [handle.run_id], interval=0.05)
    info = await fk.get_run(handle.run_id)
    assert info.output == "fast now"
    assert info.steps[0].failed_attempts[0].error_type == "flowkeeper.errors.StepTimeoutError"


async def test_durable_sleep_of_a_day_with_a_fake_clock(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    clock = await FakeClock(conn).install()
    done: list[str] = []

    @fk.workflow("reviews")
    async def reviews(ctx: Context) -> None:
        await ctx.step("receipt", lambda: done.append("receipt"))
        await ctx.sleep("wait-1-day", timedelta(days=1))
        await ctx.step("ask-review", lambda: done.append("review"))

    async with serve(fk):
        handle = await fk.trigger("reviews")
        await wait_for(lambda: _status_is(fk, handle.run_id, "sleeping"))
        info = await fk.get_run(handle.run_id)
        assert info.steps[-1].kind == "sleep"
        assert info.steps[-1].status == "sleeping"
        assert info.due_at is not None
        assert timedelta(hours=23) < info.due_at - info.steps[-1].started_at  # type: ignore[operator]
        assert (await fk.tick()).claimed == 0  # not due: nothing dispatched
        await clock.advance(timedelta(hours=23))
        assert (await fk.tick()).claimed == 0
        await clock.advance(timedelta(hours=1, seconds=1))
        await drive(fk, [handle.run_id])
    assert done == ["receipt", "review"]
    info = await fk.get_run(handle.run_id)
    assert info.steps[1].status == "completed"
    assert info.invocations == 2


async def test_sleep_until_and_zero_sleeps(fk: FlowKeeper, conn: asyncpg.Connection) -> None:
    clock = await FakeClock(conn).install()

    @fk.workflow("w")
    async def w(ctx: Context) -> str:
        await ctx.sleep("no-op", 0)
        await ctx.sleep_until("past", datetime(2000, 1, 1, tzinfo=UTC))
        await ctx.sleep_until("far", datetime.now(UTC) + timedelta(days=30))
        return "woke"

    async with serve(fk):
        handle = await fk.trigger("w")
        await wait_for(lambda: _status_is(fk, handle.run_id, "sleeping"))
        await clock.advance(timedelta(days=31))
        await drive(fk, [handle.run_id])
    assert await fk.result(handle.run_id) == "woke"


async def test_a_loop_numbers_repeated_step_names(fk: FlowKeeper) -> None:
    @fk.workflow("loop")
    async def loop(ctx: Context, n: int) -> list[int]:
        out = []
        for i in range(n):
            out.append(await ctx.step("square", lambda i=i: i * i))
        return out

    async with serve(fk):
        handle = await fk.trigger("loop", 4)
        assert await fk.result(handle.run_id, timeout=10) == [0, 1, 4, 9]
    info = await fk.get_run(handle.run_id)
    assert [s.key for s in info.steps] == ["square", "square#2", "square#3", "square#4"]


async def test_result_raises_for_cancelled_and_times_out(fk: FlowKeeper) -> None:
    @fk.workflow("sleepy")
    async def sleepy(ctx: Context) -> None:
        await ctx.sleep("long", timedelta(hours=1))

    async with serve(fk):
        handle = await fk.trigger("sleepy")
        await wait_for(lambda: _status_is(fk, handle.run_id, "sleeping"))
        with pytest.raises(RunTimeoutError):
            await fk.result(handle.run_id, timeout=0.2)
        assert await fk.cancel(handle.run_id, reason="customer left")
        assert not await fk.cancel(handle.run_id)  # already finished
        with pytest.raises(RunCancelledError):
            await fk.result(handle.run_id, timeout=1)
    info = await fk.get_run(handle.run_id)
    assert info.status == "cancelled"
    assert info.due_at is None
    assert info.events[-1].kind == "cancelled"
    assert info.events[-1].detail == {"reason": "customer left"}


async def test_non_serialisable_step_result_fails_the_run_clearly(fk: FlowKeeper) -> None:
    @fk.workflow("w")
    async def w(ctx: Context) -> None:
        await ctx.step("bad", lambda: object())

    async with serve(fk):
        handle = await fk.trigger("w")
        await drive(fk, [handle.run_id])
    info = await fk.get_run(handle.run_id)
    assert info.status == "failed"
    assert info.error is not None
    assert info.error["type"] == "SerializationError"
    assert "cannot be stored as JSON" in info.error["message"]


async def test_register_and_define_workflow(fk: FlowKeeper) -> None:
    async def hello(ctx: Context, name: str) -> str:
        return await ctx.step("greet", lambda: f"hello {name}")

    wf = fk.register(define_workflow("hello", hello))
    async with serve(fk):
        handle = await fk.trigger(wf, "ada")
        assert await handle.result(timeout=10) == "hello ada"


async def test_trigger_inside_a_transaction_is_an_outbox(fk: FlowKeeper, database_url: str) -> None:
    @fk.workflow("w")
    async def w(ctx: Context, n: int) -> int:
        return n * 2

    async with serve(fk):
        conn = await asyncpg.connect(database_url)
        try:
            async with conn.transaction():
                await conn.execute("CREATE TABLE orders (id int)")
                committed = await fk.trigger("w", 21, connection=conn)
                # Not visible outside the transaction yet.
                with pytest.raises(Exception):
                    await fk.get_run(committed.run_id)
            assert await fk.result(committed.run_id, timeout=10) == 42

            tx = conn.transaction()
            await tx.start()
            rolled_back = await fk.trigger("w", 1, connection=conn)
            await tx.rollback()
            await asyncio.sleep(0.3)
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM flowkeeper.runs WHERE id = $1", rolled_back.run_id
                )
                == 0
            )
        finally:
            await conn.close()


async def test_failed_push_leaves_the_run_due_for_the_scheduler(database_url: str) -> None:
    fk = make_fk(database_url)  # nothing listens on its port yet

    @fk.workflow("w")
    async def w(ctx: Context) -> str:
        return "ran"

    try:
        handle = await fk.trigger("w")
        info = await fk.get_run(handle.run_id)
        assert info.status == "queued"
        assert info.due_at is not None
        assert info.due_at <= datetime.now(UTC)
        async with serve(fk):
            await drive(fk, [handle.run_id])
        assert await fk.result(handle.run_id) == "ran"
    finally:
        await fk.aclose()


async def test_budget_exhausted_hands_the_run_on(database_url: str) -> None:
    fk = make_fk(database_url, time_budget=0.15)
    try:

        @fk.workflow("long")
        async def long(ctx: Context) -> int:
            total = 0
            for i in range(12):
                total += await ctx.step("tick", _slow_identity, i)
            return total

        async with serve(fk):
            handle = await fk.trigger("long")
            assert await fk.result(handle.run_id, timeout=20) == sum(range(12))
        info = await fk.get_run(handle.run_id)
        # Continuations pushed by the endpoint itself, without a scheduler tick.
        assert info.invocations >= 3
        assert len(info.steps) == 12
    finally:
        await fk.aclose()


async def _slow_identity(i: int) -> int:
    await asyncio.sleep(0.05)
    return i


async def _status_is(fk: FlowKeeper, run_id: str, status: str) -> bool:
    return (await fk.get_run(run_id)).status == status
