"""``flowkeeper scheduler``: LISTEN/NOTIFY plus a timer, several at once, clean SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from flowkeeper import (
    ConfigurationError,
    Context,
    FlowKeeper,
    RunNotFoundError,
    define_workflow,
)
from flowkeeper.scheduler import SchedulerLoop
from flowkeeper.testing.postgres import free_port

from ..helpers import KEY, make_fk, serve, wait_for
from .test_scheduler import ROOT, CountingApp, insert_due_runs

# The loops below look at the database at most every 30 s on their own: anything
# faster than that was a notification or the timer to the next due time.
IDLE = 30.0


@contextlib.asynccontextmanager
async def running(loop: SchedulerLoop) -> AsyncIterator[SchedulerLoop]:
    task = asyncio.create_task(loop.run())
    try:
        await wait_for(lambda: _true(loop.listening), timeout=10)
        yield loop
    finally:
        loop.stop()
        await asyncio.wait_for(task, 15)


async def _true(value: bool) -> bool:
    return value


def _napper(fk: FlowKeeper, seconds: float) -> None:
    @fk.workflow("nap")
    async def nap(ctx: Context, n: int) -> int:
        await ctx.step("before", lambda: n)
        await ctx.sleep("nap", seconds)
        return await ctx.step("after", lambda: n + 1)


async def _lateness(conn: asyncpg.Connection) -> list[float]:
    """Per run: when the step after the sleep started, minus the sleep's wake time."""
    rows = await conn.fetch(
        """SELECT extract(epoch FROM a.started_at - s.wake_at)::float8 AS late
           FROM flowkeeper.steps s JOIN flowkeeper.steps a USING (run_id)
           WHERE s.kind = 'sleep' AND a.key = 'after'"""
    )
    return [r["late"] for r in rows]


async def _completed(conn: asyncpg.Connection, count: int) -> bool:
    done = await conn.fetchval("SELECT count(*) FROM flowkeeper.runs WHERE status = 'completed'")
    return done == count


async def test_two_second_sleeps_wake_within_a_fraction_of_a_second(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    _napper(fk, 2)
    loop = SchedulerLoop(fk, max_idle=IDLE)
    async with serve(fk), running(loop):
        for i in range(20):
            await fk.trigger("nap", i)
            await asyncio.sleep(0.05)
        await wait_for(lambda: _completed(conn, 20), timeout=20)
    late = await _lateness(conn)
    assert len(late) == 20
    assert max(late) < 0.5, sorted(late)
    assert min(late) >= 0  # never woken early
    # Woken by the timer, not by polling: about one tick per wake-up, not one per millisecond.
    assert loop.ticks < 80, loop.ticks


async def test_several_loops_at_once_dispatch_each_run_once(
    database_url: str, conn: asyncpg.Connection
) -> None:
    serving = make_fk(database_url, pool_size=8)

    @serving.workflow("echo")
    async def echo(ctx: Context, n: int) -> int:
        return n

    counting = CountingApp(serving.asgi())
    others = [make_fk(database_url, endpoint=serving.dispatcher.endpoint) for _ in range(3)]
    loops = [SchedulerLoop(o, max_idle=IDLE) for o in others]
    try:
        async with serve(serving, counting), contextlib.AsyncExitStack() as stack:
            for loop in loops:
                await stack.enter_async_context(running(loop))
            # Due over the next second: every loop hears every notification.
            rows = await conn.fetch(
                """INSERT INTO flowkeeper.runs (id, workflow, status, input, due_at)
                   SELECT gen_random_uuid(), 'echo', 'queued', to_jsonb(i),
                          flowkeeper.clock_now() + random() * interval '1 second'
                   FROM generate_series(1, 300) AS i
                   RETURNING id"""
            )
            ids = [str(r["id"]) for r in rows]
            await wait_for(lambda: _completed(conn, 300), timeout=30)
        assert set(counting.arrivals) == set(ids)
        assert max(counting.arrivals.values()) == 1
        assert sum(1 for loop in loops if loop.dispatched) >= 2
        assert sum(loop.dispatched for loop in loops) == 300
    finally:
        for other in others:
            await other.aclose()
        await serving.aclose()


async def test_outbox_trigger_wakes_the_loop_when_the_transaction_commits(
    database_url: str, conn: asyncpg.Connection
) -> None:
    fk = make_fk(database_url)
    trigger_side = make_fk(database_url, endpoint=None)  # pushes nothing
    for instance in (fk, trigger_side):

        @instance.workflow("echo")
        async def echo(ctx: Context, n: int) -> int:
            return n

    loop = SchedulerLoop(fk, max_idle=IDLE)
    try:
        async with serve(fk), running(loop):
            await asyncio.sleep(0.2)  # the loop's first tick is done; it waits on its timer
            other = await asyncpg.connect(database_url)
            try:
                async with other.transaction():
                    handle = await trigger_side.trigger("echo", 7, connection=other)
                    await asyncio.sleep(0.5)
                    with pytest.raises(RunNotFoundError):  # invisible until it commits
                        await fk.get_run(handle.run_id)
                committed = time.monotonic()
            finally:
                await other.close()
            assert await fk.result(handle.run_id, timeout=5) == 7
            assert time.monotonic() - committed < 2
    finally:
        await trigger_side.aclose()
        await fk.aclose()


async def test_handoff_whose_push_failed_continues_without_waiting(
    database_url: str, conn: asyncpg.Connection
) -> None:
    # The serving app's own endpoint URL points nowhere: its continuation pushes fail,
    # so each handoff leaves the run due, and only the loop can carry it on.
    port = free_port()
    serving = make_fk(
        database_url, port=port, time_budget=0.15, endpoint="http://127.0.0.1:9/api/flowkeeper"
    )
    scheduler_side = make_fk(database_url, port=port)

    async def slow(i: int) -> int:
        await asyncio.sleep(0.05)
        return i

    async def long(ctx: Context) -> int:
        return sum([await ctx.step("s", slow, i) for i in range(12)])

    for instance in (serving, scheduler_side):
        instance.register(define_workflow("long", long))

    loop = SchedulerLoop(scheduler_side, max_idle=IDLE)
    try:
        async with serve(serving), running(loop):
            handle = await scheduler_side.trigger("long")
            started = time.monotonic()
            assert await serving.result(handle.run_id, timeout=15) == sum(range(12))
            assert time.monotonic() - started < 8
        info = await serving.get_run(handle.run_id)
        assert info.invocations >= 3  # several handoffs, each resumed by the loop
    finally:
        await scheduler_side.aclose()
        await serving.aclose()


async def test_listen_connection_killed_reconnects_and_keeps_waking(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    _napper(fk, 1)
    loop = SchedulerLoop(fk, max_idle=IDLE, poll_interval=0.5)
    async with serve(fk), running(loop):
        listening = (
            "SELECT pid FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN %' AND datname = current_database()"
        )
        before = await conn.fetchval(listening)
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", before)

        async def listening_again() -> bool:
            pid = await conn.fetchval(listening)
            return pid is not None and pid != before and loop.listening

        await wait_for(listening_again, timeout=10)
        await fk.trigger("nap", 1)
        await wait_for(lambda: _completed(conn, 1), timeout=10)
    [late] = await _lateness(conn)
    assert late < 0.5


async def test_endpoint_down_does_not_make_the_loop_spin(
    database_url: str, conn: asyncpg.Connection
) -> None:
    fk = make_fk(database_url)  # nothing serves its endpoint
    loop = SchedulerLoop(fk, max_idle=IDLE)
    try:
        await insert_due_runs(conn, "echo", 5)
        async with running(loop):
            await asyncio.sleep(3)
        assert loop.ticks <= 6, loop.ticks
        failures = await conn.fetchval("SELECT sum(dispatch_failures) FROM flowkeeper.runs")
        assert 5 <= failures <= 15
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM flowkeeper.runs WHERE lease_token IS NOT NULL"
            )
            == 0
        )
    finally:
        await fk.aclose()


async def test_a_transaction_pooler_url_is_refused_with_advice(database_url: str) -> None:
    pooled = make_fk(database_url + "?pgbouncer=true")
    try:
        with pytest.raises(ConfigurationError) as err:
            SchedulerLoop(pooled)
        assert "session" in str(err.value)
        assert "--listen-url" in str(err.value)
        SchedulerLoop(pooled, listen_url=database_url)  # a direct URL for LISTEN is enough
        with pytest.raises(ConfigurationError, match="FLOWKEEPER_ENDPOINT"):
            SchedulerLoop(make_fk(database_url, endpoint=None))
    finally:
        await pooled.aclose()


@pytest.mark.slow
async def test_cli_scheduler_wakes_runs_and_stops_cleanly_on_sigterm(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    _napper(fk, 1)
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "DATABASE_URL": fk.db.url,
        "FLOWKEEPER_SIGNING_KEY": KEY,
        "FLOWKEEPER_ENDPOINT": fk.dispatcher.endpoint,  # type: ignore[union-attr]
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from flowkeeper.cli import main; sys.exit(main())",
        "scheduler",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with serve(fk):
            for i in range(3):
                await fk.trigger("nap", i)
            await wait_for(lambda: _completed(conn, 3), timeout=20)
            # A run that is mid-sleep when the scheduler stops is not lost: it stays due.
            late = await fk.trigger("nap", 9)
            await wait_for(lambda: _status(conn, late.run_id, "sleeping"), timeout=10)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out, err = stdout.decode(), stderr.decode()
    assert proc.returncode == 0, err
    assert "listening on flowkeeper_due" in out
    assert "stopped after" in out
    assert "Traceback" not in err
    lateness = await _lateness(conn)
    assert len(lateness) == 3
    assert max(lateness) < 0.5, lateness
    row = await conn.fetchrow(
        "SELECT status, lease_token FROM flowkeeper.runs WHERE id = $1",
        late.run_id,
    )
    assert (row["status"], row["lease_token"]) == ("sleeping", None)


async def _status(conn: asyncpg.Connection, run_id: str, status: str) -> bool:
    return await conn.fetchval("SELECT status FROM flowkeeper.runs WHERE id = $1", run_id) == status


async def test_database_down_the_loop_backs_off_and_still_stops_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fk = make_fk(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    loop = SchedulerLoop(fk, max_idle=IDLE)
    try:
        task = asyncio.create_task(loop.run())
        await asyncio.sleep(2.5)
        assert not task.done()  # a long-running service rides out an outage
        loop.stop()
        await asyncio.wait_for(task, 10)
    finally:
        await fk.aclose()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors
    assert all("Cannot connect to Postgres" in e for e in errors)
    assert len(errors) <= 6  # 0.5 s, 1 s, 2 s ... apart, not a tight loop
