"""Replay from a chosen step, retry now, bulk replay, and the runs list's filters."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from flowkeeper import (
    ConfigurationError,
    Context,
    FlowKeeper,
    NonRetriableError,
    RetryPolicy,
    RunNotFoundError,
    RunStateError,
)
from flowkeeper.runlist import id_floor, id_time, parse_time

from ..helpers import drive, make_fk, serve, wait_for


def _pipeline(fk: FlowKeeper, calls: Counter[str], broken: set[str]) -> None:
    """a -> b -> c; a step whose name is in ``broken`` fails at once."""

    def body(name: str) -> str:
        calls[name] += 1
        if name in broken:
            raise NonRetriableError(f"{name} is broken")
        return f"{name}-{calls[name]}"

    @fk.workflow("pipe")
    async def pipe(ctx: Context) -> list[str]:
        return [await ctx.step(n, body, n) for n in ("a", "b", "c")]


async def test_replay_from_the_failed_step_keeps_earlier_results(fk: FlowKeeper) -> None:
    calls: Counter[str] = Counter()
    broken = {"b"}
    _pipeline(fk, calls, broken)
    async with serve(fk):
        run_id = (await fk.trigger("pipe")).run_id
        assert (await drive(fk, [run_id]))[run_id] == "failed"
        info = await fk.get_run(run_id)
        assert info.error is not None and info.error["step"] == "b"

        broken.clear()  # the fix is deployed
        await fk.replay(run_id, reason="fixed b", actor="test")
        assert await fk.result(run_id, timeout=10) == ["a-1", "b-2", "c-1"]
    assert calls == {"a": 1, "b": 2, "c": 1}  # a was not run again
    info = await fk.get_run(run_id)
    replayed = [e for e in info.events if e.kind == "replayed"]
    assert len(replayed) == 1
    detail = replayed[0].detail or {}
    assert replayed[0].step_key == "b"
    assert detail["from_step"] == "b"
    assert detail["previous_status"] == "failed"
    assert detail["previous_error"]["message"] == "b is broken"
    assert detail["forgotten"] == ["b"]
    assert detail["by"] == "test" and detail["reason"] == "fixed b"
    assert info.error is None and info.finished_at is not None


async def test_replay_from_an_earlier_step_runs_it_and_all_later_ones(fk: FlowKeeper) -> None:
    calls: Counter[str] = Counter()
    _pipeline(fk, calls, set())
    async with serve(fk):
        run_id = (await fk.trigger("pipe")).run_id
        assert await fk.result(run_id, timeout=10) == ["a-1", "b-1", "c-1"]
        await fk.replay(run_id, from_step="b")
        assert await fk.result(run_id, timeout=10) == ["a-1", "b-2", "c-2"]
    assert calls == {"a": 1, "b": 2, "c": 2}
    event = next(e for e in (await fk.get_run(run_id)).events if e.kind == "replayed")
    assert (event.detail or {})["forgotten"] == ["b", "c"]


async def test_replay_is_refused_for_live_runs_and_unknown_steps(fk: FlowKeeper) -> None:
    calls: Counter[str] = Counter()
    _pipeline(fk, calls, set())
    run_id = (await fk.trigger("pipe")).run_id  # not served: stays queued
    with pytest.raises(RunStateError, match="Cancel it first"):
        await fk.replay(run_id)
    with pytest.raises(RunNotFoundError):
        await fk.replay(str(uuid.uuid4()))
    async with serve(fk):
        await drive(fk, [run_id])
        with pytest.raises(RunStateError, match=r"has no recorded step 'nope'.*a, b, c"):
            await fk.replay(run_id, from_step="nope")
        with pytest.raises(RunStateError, match="say which step"):
            await fk.replay(run_id)  # completed: the step must be named
    assert (await fk.get_run(run_id)).status == "completed"
    assert not [e for e in (await fk.get_run(run_id)).events if e.kind == "replayed"]


async def test_replay_of_a_cancelled_run_resumes_where_it_stopped(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    calls: Counter[str] = Counter()

    def step(name: str) -> str:
        calls[name] += 1
        return name

    @fk.workflow("napper")
    async def napper(ctx: Context) -> str:
        await ctx.step("before", step, "before")
        await ctx.sleep("nap", timedelta(hours=1))
        return await ctx.step("after", step, "after")

    async with serve(fk):
        run_id = (await fk.trigger("napper")).run_id
        await wait_for(lambda: _status_is(fk, run_id, "sleeping"))
        assert await fk.cancel(run_id)
        await fk.replay(run_id)  # resumes: nothing forgotten, the sleep still counts
        await wait_for(lambda: _status_is(fk, run_id, "sleeping"))
        info = await fk.get_run(run_id)
        assert [s.key for s in info.steps] == ["before", "nap"]
        assert calls == {"before": 1}
        # The sleep's wake time was kept: jump past it and the run finishes.
        await conn.execute(
            "UPDATE flowkeeper.steps SET wake_at = now() WHERE run_id = $1 AND key = 'nap'",
            uuid.UUID(run_id),
        )
        await conn.execute(
            "UPDATE flowkeeper.runs SET due_at = now() WHERE id = $1", uuid.UUID(run_id)
        )
        assert (await drive(fk, [run_id]))[run_id] == "completed"
    assert calls == {"before": 1, "after": 1}


async def _status_is(fk: FlowKeeper, run_id: str, status: str) -> bool:
    return (await fk.get_run(run_id)).status == status


async def test_retry_now_skips_the_backoff_of_a_waiting_step(fk: FlowKeeper) -> None:
    attempts = Counter[str]()

    def flaky() -> str:
        attempts["flaky"] += 1
        if attempts["flaky"] == 1:
            raise ConnectionError("upstream down")
        return "ok"

    @fk.workflow("patient", retry=RetryPolicy(max_attempts=3, initial_delay=3600, jitter=0))
    async def patient(ctx: Context) -> str:
        return await ctx.step("call", flaky)

    async with serve(fk):
        run_id = (await fk.trigger("patient")).run_id
        await wait_for(lambda: _status_is(fk, run_id, "retrying"))
        assert await fk.retry(run_id, actor="test")  # an hour early
        assert await fk.result(run_id, timeout=10) == "ok"
        with pytest.raises(RunStateError, match="retry applies to a failed run"):
            await fk.retry(run_id)
    info = await fk.get_run(run_id)
    retried = [e for e in info.events if e.kind == "retried"]
    assert len(retried) == 1 and retried[0].step_key == "call" and retried[0].attempt == 2
    assert info.steps[0].attempts == 2


async def test_retry_of_a_failed_run_reruns_the_failed_step(fk: FlowKeeper) -> None:
    calls: Counter[str] = Counter()
    broken = {"c"}
    _pipeline(fk, calls, broken)
    async with serve(fk):
        run_id = (await fk.trigger("pipe")).run_id
        await drive(fk, [run_id])
        broken.clear()
        assert await fk.retry(run_id)
        assert await fk.result(run_id, timeout=10) == ["a-1", "b-1", "c-2"]
    kinds = [e.kind for e in (await fk.get_run(run_id)).events]
    assert "retried" in kinds and "replayed" not in kinds


async def test_bulk_replay_of_a_workflows_failed_runs(fk: FlowKeeper) -> None:
    calls: Counter[str] = Counter()
    broken = {"b"}
    _pipeline(fk, calls, broken)

    @fk.workflow("other")
    async def other(ctx: Context) -> None:
        await ctx.step("x", _raise)

    async with serve(fk):
        failing = [(await fk.trigger("pipe")).run_id for _ in range(3)]
        unrelated = (await fk.trigger("other")).run_id
        await drive(fk, [*failing, unrelated])
        broken.clear()
        replayed = await fk.replay_failed("pipe", actor="test")
        assert sorted(replayed) == sorted(failing)
        statuses = await drive(fk, failing)
    assert set(statuses.values()) == {"completed"}
    assert calls["a"] == 3  # kept
    assert (await fk.get_run(unrelated)).status == "failed"  # another workflow: untouched
    assert await fk.replay_failed("pipe") == []


def _raise() -> None:
    raise NonRetriableError("always")


async def test_list_runs_filters_pages_and_counts(fk: FlowKeeper, conn: asyncpg.Connection) -> None:
    @fk.workflow("alpha")
    async def alpha(ctx: Context) -> None:
        return None

    @fk.workflow("beta")
    async def beta(ctx: Context) -> None:
        return None

    ids = []
    for i in range(7):
        ids.append((await fk.trigger("alpha", idempotency_key=f"order-{i}")).run_id)
        await asyncio.sleep(0.002)  # distinct milliseconds in the UUIDv7 ids
    ids.append((await fk.trigger("beta")).run_id)
    await conn.execute(
        "UPDATE flowkeeper.runs SET status = 'failed' WHERE id = ANY($1::uuid[])",
        [uuid.UUID(i) for i in ids[:2]],
    )

    page = await fk.list_runs(limit=3)
    assert [r.id for r in page.runs] == ids[::-1][:3]  # newest first
    assert page.counts == {"queued": 6, "failed": 2}
    assert page.total == 8
    page2 = await fk.list_runs(limit=3, before=page.next_before)
    assert [r.id for r in page2.runs] == ids[::-1][3:6]
    page3 = await fk.list_runs(limit=3, before=page2.next_before)
    assert [r.id for r in page3.runs] == ids[::-1][6:]
    assert page3.next_before is None

    failed = await fk.list_runs(status="failed")
    assert [r.id for r in failed.runs] == [ids[1], ids[0]]
    assert failed.runs[0].status == "failed"
    beta_runs = await fk.list_runs(workflow="beta")
    assert [r.id for r in beta_runs.runs] == [ids[7]]
    assert beta_runs.counts == {"queued": 1}
    assert [r.id for r in (await fk.list_runs(workflow="alpha", status="failed")).runs] == [
        ids[1],
        ids[0],
    ]
    assert [r.id for r in (await fk.list_runs(search="order-4")).runs] == [ids[4]]
    assert [r.id for r in (await fk.list_runs(search=ids[5])).runs] == [ids[5]]
    assert (await fk.list_runs(search="no-such-key")).runs == []
    # Time range: ids carry their creation time.
    since = id_time(ids[3])
    until = id_time(ids[6])
    ranged = await fk.list_runs(since=since, until=until)
    assert [r.id for r in ranged.runs] == [ids[5], ids[4], ids[3]]
    assert await fk.list_workflows() == ["alpha", "beta"]


async def test_list_filter_input_is_checked(fk: FlowKeeper) -> None:
    with pytest.raises(ConfigurationError, match="Unknown run status 'broken'"):
        await fk.list_runs(status="broken")
    with pytest.raises(ConfigurationError, match="30m, 6h"):
        await fk.list_runs(since="yesterday-ish")
    with pytest.raises(ConfigurationError, match="between 1 and 500"):
        await fk.list_runs(limit=0)
    with pytest.raises(ConfigurationError, match="not a run id"):
        await fk.list_runs(before="x")


def test_times_and_id_bounds() -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_time("2h", now=now) == now - timedelta(hours=2)
    assert parse_time("1w", now=now) == now - timedelta(days=7)
    assert parse_time("2025-03-01T10:00:00Z") == datetime(2025, 3, 1, 10, tzinfo=UTC)
    assert parse_time("2025-03-01T10:00:00") == datetime(2025, 3, 1, 10, tzinfo=UTC)
    assert id_time(id_floor(now)) == now
    assert id_floor(now) < id_floor(now + timedelta(milliseconds=1))


async def test_replay_without_endpoint_leaves_the_run_due_for_the_scheduler(
    database_url: str,
) -> None:
    calls: Counter[str] = Counter()
    broken = {"a"}
    served = make_fk(database_url)
    _pipeline(served, calls, broken)
    offline = FlowKeeper(database_url, signing_key="k" * 32)  # no endpoint URL
    try:
        async with serve(served):
            run_id = (await served.trigger("pipe")).run_id
            await drive(served, [run_id])
            broken.clear()
            await offline.replay(run_id)
            row = await offline.store.run_state(run_id)
            assert row is not None and row["status"] == "queued" and not row["leased"]
            assert (await drive(served, [run_id]))[run_id] == "completed"
    finally:
        await offline.aclose()
        await served.aclose()


async def test_a_resumed_run_gets_its_history_in_position_order(fk: FlowKeeper) -> None:
    """claim_run sends the history unordered (an ordered aggregate would sort a
    copy of every output); the store puts it back in position order, whatever
    order the step keys sort in."""
    names = ["zeta", "alpha", "mid", "b10", "b9", "Ä", "a b"]

    @fk.workflow("ordered")
    async def ordered(ctx: Context) -> None:
        for name in names:
            await ctx.step(name, lambda name=name: name)
        await ctx.sleep("nap", 3600)

    handle = await fk.trigger("ordered")
    await fk.advance(handle.run_id)  # the steps, then asleep
    async with fk.db.acquire() as conn:
        await conn.execute(
            "UPDATE flowkeeper.runs SET due_at = now() - interval '1 second' WHERE id = $1",
            uuid.UUID(handle.run_id),
        )
    claimed = await fk.store.claim(handle.run_id, None, uuid.uuid4(), timedelta(minutes=1))
    assert claimed is not None
    assert [h.name for h in claimed.history] == [*names, "nap"]
    assert [h.position for h in claimed.history] == list(range(len(names) + 1))
