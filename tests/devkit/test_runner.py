"""The test kit (flowkeeper.testing's pytest plugin) used as a user uses it.

The fixtures come from the installed entry point, not from a conftest: this
module only says which FlowKeeper holds its workflows (``flowkeeper_app``).
Every run is real: a database per test, the engine's own invocations, a
FakeClock in Postgres.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta

import pytest
from pydantic import BaseModel

from flowkeeper import Context, FlowKeeper, RetryPolicy, RunStatus
from flowkeeper.testing import StepMock, WorkflowRunner

# Never connected: the runner executes these workflows on a database of its own.
fk = FlowKeeper(
    "postgresql://nobody@unused.invalid/none", signing_key="k" * 32, endpoint="http://x.invalid"
)
calls: list[str] = []


class Order(BaseModel):
    id: str
    amount_cents: int


class Charge(BaseModel):
    id: str


async def charge_card(order: Order) -> Charge:
    calls.append(f"charge {order.id}")
    return Charge(id=f"ch_{order.id}")


def send_receipt(order: Order, charge: Charge) -> str:
    calls.append(f"receipt {charge.id}")
    return f"receipt for {charge.id}"


@fk.workflow("checkout", retry=RetryPolicy(max_attempts=3, initial_delay=60, jitter=0))
async def checkout(ctx: Context, order: Order) -> str:
    charge = await ctx.step("charge-card", charge_card, order)
    await ctx.step("send-receipt", send_receipt, order, charge)
    await ctx.sleep("wait-1-day", timedelta(days=1))
    return charge.id


@fk.workflow("approval")
async def approval(ctx: Context, order: Order) -> str:
    decision = await ctx.wait_for_event(
        "approved", event="order.approved", match={"order_id": order.id}, timeout=3600
    )
    return "timed out" if decision is None else str(decision["by"])


@fk.workflow("loop")
async def loop(ctx: Context, n: int) -> int:
    total = 0
    for i in range(n):
        total += await ctx.step("add", lambda i=i: i)
    return total


@pytest.fixture
def flowkeeper_app() -> FlowKeeper:
    return fk


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


async def test_a_one_day_sleep_completes_at_once(flowkeeper_runner: WorkflowRunner) -> None:
    started = time.monotonic()
    info = await flowkeeper_runner.run("checkout", Order(id="o-1", amount_cents=100))
    assert info.status == RunStatus.COMPLETED
    assert info.output == "ch_o-1"
    assert [s.name for s in info.steps] == ["charge-card", "send-receipt", "wait-1-day"]
    assert calls == ["charge o-1", "receipt ch_o-1"]
    assert info.finished_at is not None and info.finished_at - info.created_at >= timedelta(days=1)
    assert time.monotonic() - started < 10  # skipped on the clock, not slept


async def test_mock_step_returns_a_value_typed_as_the_original(
    flowkeeper_runner: WorkflowRunner,
) -> None:
    mock = flowkeeper_runner.mock_step("charge-card", returns=Charge(id="ch_mocked"))
    info = await flowkeeper_runner.run("checkout", Order(id="o-2", amount_cents=1))
    assert info.status == "completed" and info.output == "ch_mocked"
    assert isinstance(mock, StepMock) and mock.call_count == 1
    # the receipt step received a Charge (the original's annotation shaped the result)
    assert calls == ["receipt ch_mocked"]


async def test_mock_step_raises_until_retries_are_exhausted(
    flowkeeper_runner: WorkflowRunner,
) -> None:
    mock = flowkeeper_runner.mock_step("charge-card", raises=ConnectionError("card network down"))
    info = await flowkeeper_runner.run("checkout", Order(id="o-3", amount_cents=1))
    assert info.status == RunStatus.FAILED
    assert mock.call_count == 3  # every attempt of the policy, the 60 s delays skipped
    step = info.steps[0]
    assert [a.error_type.rsplit(".", 1)[-1] for a in step.failed_attempts][:2] == [
        "ConnectionError",
        "ConnectionError",
    ]
    assert "card network down" in str(info.error)
    assert calls == []


async def test_a_mocked_result_that_cannot_be_stored_fails_the_step_once(
    flowkeeper_runner: WorkflowRunner,
) -> None:
    mock = flowkeeper_runner.mock_step("send-receipt", returns=math.nan)
    info = await flowkeeper_runner.run("checkout", Order(id="o-4", amount_cents=1))
    assert info.status == RunStatus.FAILED
    assert "SerializationError" in str(info.error)
    assert mock.call_count == 1  # not retried: it would fail the same way


async def test_mock_side_effect_sees_the_arguments(flowkeeper_runner: WorkflowRunner) -> None:
    seen: list[Order] = []

    async def fake(order: Order) -> Charge:
        seen.append(order)
        return Charge(id="ch_side")

    flowkeeper_runner.mock_step("charge-card", side_effect=fake)
    info = await flowkeeper_runner.run("checkout", {"id": "o-5", "amount_cents": 7})
    assert info.output == "ch_side"
    assert seen == [Order(id="o-5", amount_cents=7)]


def test_mock_step_takes_exactly_one_answer() -> None:
    runner = WorkflowRunner.__new__(WorkflowRunner)
    runner.mocks = {}
    with pytest.raises(ValueError, match="exactly one"):
        runner.mock_step("x")
    with pytest.raises(ValueError, match="exactly one"):
        runner.mock_step("x", returns=1, raises=ValueError)


async def test_a_wait_returns_waiting_until_the_event_is_sent(
    flowkeeper_runner: WorkflowRunner,
) -> None:
    info = await flowkeeper_runner.run("approval", Order(id="o-6", amount_cents=1))
    # a wait with a timeout is not skipped over by run(): the event may still come
    assert info.status == RunStatus.WAITING
    sent = await flowkeeper_runner.send_event("order.approved", {"order_id": "o-6", "by": "ada"})
    assert sent.woken == [info.id]
    done = await flowkeeper_runner.get_run(info.id)
    assert done.status == "completed" and done.output == "ada"


async def test_advance_past_a_wait_timeout(flowkeeper_runner: WorkflowRunner) -> None:
    info = await flowkeeper_runner.run("approval", Order(id="o-7", amount_cents=1))
    assert info.status == RunStatus.WAITING
    [after] = await flowkeeper_runner.advance(timedelta(hours=2))
    assert after.status == "completed" and after.output == "timed out"


async def test_each_test_has_a_database_of_its_own(flowkeeper_runner: WorkflowRunner) -> None:
    page = await flowkeeper_runner.fk.list_runs()
    assert page.total == 0
    info = await flowkeeper_runner.run("loop", 30)
    assert info.output == sum(range(30)) and len(info.steps) == 30


async def test_idempotency_key_returns_the_first_run(flowkeeper_runner: WorkflowRunner) -> None:
    page = await flowkeeper_runner.fk.list_runs()
    assert page.total == 0  # the previous test's runs are not here
    first = await flowkeeper_runner.run("loop", 2, idempotency_key="k-1")
    again = await flowkeeper_runner.run("loop", 2, idempotency_key="k-1")
    assert first.id == again.id and again.status == "completed"
