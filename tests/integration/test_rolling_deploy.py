"""A rolling deploy: old instances do not know a workflow that new code triggers.

Two FlowKeeper apps on one database, each served by a real uvicorn: ``old``
knows only ``legacy``, ``new`` knows ``checkout`` too.  An invocation that
lands on ``old`` defers the run (it stays live, due later with a backoff, the
reason recorded as a ``workflow_unknown`` event); ``new`` then completes it.
Only after ``unknown_workflow_grace`` of not being known does the run fail,
with the failure alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from flowkeeper import ConfigurationError, Context, FlowKeeper, RetryPolicy
from flowkeeper.cli.runs import _print_run
from flowkeeper.dashboard.timeline import build
from flowkeeper.dashboard.views import run_json
from flowkeeper.signing import RequestSigner
from flowkeeper.sql import load_queries, parse_queries
from flowkeeper.testing import FakeClock

from ..helpers import KEY, make_fk, serve, wait_for
from .test_pgcron import needs_pg_cron, needs_plpython

UNKNOWN = "flowkeeper.errors.UnknownWorkflowError"


def _old(database_url: str, **kwargs: Any) -> FlowKeeper:
    fk = make_fk(database_url, **kwargs)

    @fk.workflow("legacy")
    async def legacy(ctx: Context) -> str:
        return "legacy"

    return fk


def _new(database_url: str, **kwargs: Any) -> FlowKeeper:
    fk = _old(database_url, **kwargs)

    @fk.workflow("checkout")
    async def checkout(ctx: Context, order: str) -> str:
        charged = await ctx.step("charge", lambda: f"charged {order}")
        return f"{charged}, done"

    return fk


@pytest.fixture
async def clock(conn: asyncpg.Connection) -> FakeClock:
    return await FakeClock(conn).install()


@pytest.fixture
async def apps(database_url: str) -> AsyncIterator[tuple[FlowKeeper, FlowKeeper]]:
    old, new = _old(database_url), _new(database_url)
    try:
        yield old, new
    finally:
        await old.aclose()
        await new.aclose()


async def _queued(database_url: str, workflow: str = "checkout", order: str = "o-1") -> str:
    """A run triggered by new code in a process without an endpoint (due for a tick)."""
    trigger_side = _new(database_url, endpoint=None)
    try:
        return (await trigger_side.trigger(workflow, order)).run_id
    finally:
        await trigger_side.aclose()


async def _run(conn: asyncpg.Connection, run_id: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT status, lease_token, dispatch_failures, step_key, step_attempt, error::text, "
        "extract(epoch FROM due_at - flowkeeper.clock_now())::float8 AS due_in "
        "FROM flowkeeper.runs WHERE id = $1",
        uuid.UUID(run_id),
    )
    assert row is not None
    return row


async def _events(conn: asyncpg.Connection, run_id: str, kind: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT detail::text FROM flowkeeper.events WHERE run_id = $1 AND kind = $2 ORDER BY id",
        uuid.UUID(run_id),
        kind,
    )
    return [json.loads(r["detail"]) for r in rows]


def _at(iso: str) -> datetime:
    return datetime.fromisoformat(iso)  # Postgres trims trailing zeros of microseconds


async def _invoke(fk: FlowKeeper, run_id: str) -> httpx.Response:
    """A signed invocation of ``run_id`` with ``wait``, straight to ``fk``'s endpoint."""
    body = json.dumps({"run_id": run_id, "lease": None, "wait": True}).encode()
    path = "/api/flowkeeper/"
    headers = RequestSigner(KEY).sign(method="POST", path=path, body=body)
    headers["Content-Type"] = "application/json"
    url = f"http://127.0.0.1:{fk.test_port}{path}"  # type: ignore[attr-defined]
    async with httpx.AsyncClient() as client:
        return await client.post(url, content=body, headers=headers)


async def _due_now(clock: FakeClock, conn: asyncpg.Connection, run_id: str) -> None:
    """Move the clock just past the run's due time."""
    due_in = (await _run(conn, run_id))["due_in"]
    await clock.advance(max(0.0, due_in) + 0.01)


# -- the two-app story ------------------------------------------------------------------
async def test_an_old_instance_defers_the_run_and_a_new_one_completes_it(
    database_url: str, conn: asyncpg.Connection, clock: FakeClock, apps: Any
) -> None:
    old, new = apps
    run_id = await _queued(database_url)
    async with serve(old), serve(new):
        response = await _invoke(old, run_id)
        # Not a 404 failure: a clear answer that the run was deferred, and why.
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["run_id"] == run_id
        assert answer["outcome"] == "deferred"
        assert answer["status"] == "queued"
        deferred = answer["deferred"]
        assert deferred["reason"] == "unknown_workflow"
        assert deferred["workflow"] == "checkout"
        assert deferred["known"] == ["legacy"]
        assert "checkout" in deferred["message"]
        assert 4 <= deferred["retry_in"] <= 6

        row = await _run(conn, run_id)
        assert row["status"] == "queued"  # still live, as it was
        assert row["lease_token"] is None
        assert 3 < row["due_in"] <= 6  # due again after the first backoff (~5 s)
        assert row["dispatch_failures"] == 0  # not counted as a dispatch failure
        assert row["error"] is None
        [event] = await _events(conn, run_id, "workflow_unknown")
        assert event["workflow"] == "checkout"
        assert event["known"] == ["legacy"]
        assert event["occurrences"] == 1
        assert event["retry_at"] and event["fails_at"]

        # The tick does not loop hot on it: nothing is due until the backoff ends.
        assert (await old.tick()).claimed == 0
        assert (await new.tick()).claimed == 0

        await _due_now(clock, conn, run_id)
        tick = await new.tick()
        assert (tick.claimed, tick.dispatched, tick.failed) == (1, 1, 0)
        assert await new.result(run_id, timeout=10) == "charged o-1, done"
    assert await _events(conn, run_id, "dispatch_failed") == []


async def test_a_trigger_handed_to_an_old_instance_creates_a_deferred_run(
    database_url: str, conn: asyncpg.Connection, clock: FakeClock, apps: Any
) -> None:
    old, new = apps
    trigger_side = _new(database_url, port=old.test_port)  # new code, old endpoint
    try:
        async with serve(old), serve(new):
            handle = await trigger_side.trigger("checkout", "o-2")
            assert handle.created
            row = await _run(conn, handle.run_id)
            assert (row["status"], row["lease_token"], row["dispatch_failures"]) == (
                "queued",
                None,
                0,
            )
            assert len(await _events(conn, handle.run_id, "workflow_unknown")) == 1
            await _due_now(clock, conn, handle.run_id)
            assert (await new.tick()).dispatched == 1
            assert await new.result(handle.run_id, timeout=10) == "charged o-2, done"
    finally:
        await trigger_side.aclose()


async def test_deferrals_back_off_and_add_a_handful_of_events(
    database_url: str, conn: asyncpg.Connection, clock: FakeClock, apps: Any
) -> None:
    old, _ = apps
    run_id = await _queued(database_url)
    waits = []
    async with serve(old):
        for _ in range(20):
            await _due_now(clock, conn, run_id)
            tick = await old.tick()
            assert (tick.claimed, tick.dispatched, tick.failed) == (1, 1, 0)
            row = await _run(conn, run_id)
            assert row["status"] == "queued"
            waits.append(row["due_in"])
            assert (await old.tick()).claimed == 0  # backed off: nothing due at once
    # Exponential from ~5 s, capped at ~5 min.
    assert 3.5 < waits[0] < 6.5
    assert 7 < waits[1] < 13
    assert all(240 <= w <= 360 for w in waits[8:]), waits
    events = await _events(conn, run_id, "workflow_unknown")
    # The 1st, 2nd, 4th, 8th and 16th deferral each add an event; the latest one
    # keeps counting (and says when the next try is).
    assert [e["occurrence"] for e in events] == [1, 2, 4, 8, 16]
    assert events[-1]["occurrences"] == 20
    assert len({e["since"] for e in events}) == 1  # one episode
    assert await _events(conn, run_id, "dispatch_failed") == []


async def test_the_run_fails_after_the_grace_period_with_the_alert(
    database_url: str, conn: asyncpg.Connection, clock: FakeClock
) -> None:
    old = _old(database_url, unknown_workflow_grace=timedelta(minutes=10))
    run_id = await _queued(database_url)
    try:
        async with serve(old):
            for _ in range(40):
                await _due_now(clock, conn, run_id)
                await old.tick()
                if (await _run(conn, run_id))["status"] == "failed":
                    break
            info = await old.get_run(run_id)
            assert info.status == "failed"
            assert info.error is not None
            assert info.error["type"] == UNKNOWN
            assert "unknown_workflow_grace" in info.error["message"]
            events = await _events(conn, run_id, "workflow_unknown")
            assert events[-1]["failed"] is True
            # One episode; the last deferral was due at the grace's end, not after it.
            assert {e["since"] for e in events} == {events[0]["since"]}
            last = events[-2]
            assert _at(last["retry_at"]) == _at(last["fails_at"])
            assert events[-1]["grace"] == 600
            # The failure alert: the outbox row from the transition to failed.
            alerts = await conn.fetchval(
                "SELECT count(*) FROM flowkeeper.alerts WHERE run_id = $1", uuid.UUID(run_id)
            )
            assert alerts == 1
            # Finished: an invocation now is told so, and the tick leaves it alone.
            assert (await old.tick()).claimed == 0
            response = await _invoke(old, run_id)
            assert response.json()["reason"] == "finished"
    finally:
        await old.aclose()


async def test_after_the_grace_the_endpoint_answers_404_unknown_workflow(
    database_url: str, conn: asyncpg.Connection, clock: FakeClock
) -> None:
    old = _old(database_url, unknown_workflow_grace=timedelta(0))  # fail at once
    run_id = await _queued(database_url)
    try:
        async with serve(old):
            response = await _invoke(old, run_id)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_workflow"
        assert response.json()["run_status"] == "failed"
        assert (await _run(conn, run_id))["status"] == "failed"
    finally:
        await old.aclose()


async def test_a_run_that_slept_a_week_gets_its_own_grace_and_episodes_reset(
    database_url: str, conn: asyncpg.Connection, clock: FakeClock
) -> None:
    def build_new() -> FlowKeeper:
        fk = _old(database_url)

        @fk.workflow("weekly")
        async def weekly(ctx: Context) -> str:
            await ctx.step("one", lambda: 1)
            await ctx.sleep("week-1", timedelta(days=7))
            await ctx.step("two", lambda: 2)
            await ctx.sleep("week-2", timedelta(days=7))
            return "done"

        return fk

    old = _old(database_url, unknown_workflow_grace=timedelta(hours=1))
    new = build_new()
    try:
        async with serve(old), serve(new):
            trigger_side = build_new()
            trigger_side.dispatcher = None  # just insert it
            run_id = (await trigger_side.trigger("weekly")).run_id
            await trigger_side.aclose()
            await new.tick()
            await _wait_status(conn, run_id, "sleeping")

            # A week later an old instance takes it: the grace counts from now, not
            # from the run's creation a week ago.
            await _due_now(clock, conn, run_id)
            await old.tick()
            row = await _run(conn, run_id)
            assert row["status"] == "sleeping"  # as it was
            [first] = await _events(conn, run_id, "workflow_unknown")

            await _due_now(clock, conn, run_id)
            await new.tick()  # the new instance goes on with it: the episode is over
            await wait_for(lambda: _has_step(conn, run_id, "week-2"), timeout=10)
            await _wait_status(conn, run_id, "sleeping")

            await _due_now(clock, conn, run_id)  # another week
            await old.tick()
            assert (await _run(conn, run_id))["status"] == "sleeping"
            events = await _events(conn, run_id, "workflow_unknown")
            assert len(events) == 2
            assert events[1]["occurrences"] == 1  # a new episode, with its own grace
            assert events[1]["since"] > first["since"]

            await _due_now(clock, conn, run_id)
            await new.tick()
            assert await new.result(run_id, timeout=10) == "done"
    finally:
        await old.aclose()
        await new.aclose()


async def test_a_retrying_run_stays_retrying_with_its_step_state(
    database_url: str, conn: asyncpg.Connection, clock: FakeClock
) -> None:
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first try fails")
        return "ok"

    new = _old(database_url)

    @new.workflow("flaky", retry=RetryPolicy(initial_delay=1, jitter=0))
    async def flaky_wf(ctx: Context) -> str:
        return await ctx.step("call", flaky)

    old = _old(database_url)
    try:
        async with serve(old), serve(new):
            run_id = (await new.trigger("flaky")).run_id
            await _wait_status(conn, run_id, "retrying")
            await _due_now(clock, conn, run_id)
            await old.tick()
            row = await _run(conn, run_id)
            assert (row["status"], row["step_key"], row["step_attempt"]) == ("retrying", "call", 1)
            assert json.loads(row["error"])["message"] == "first try fails"  # kept
            await _due_now(clock, conn, run_id)
            await new.tick()
            assert await new.result(run_id, timeout=10) == "ok"
        assert calls == 2
    finally:
        await old.aclose()
        await new.aclose()


async def _has_step(conn: asyncpg.Connection, run_id: str, key: str) -> bool:
    found = await conn.fetchval(
        "SELECT count(*) FROM flowkeeper.steps WHERE run_id = $1 AND key = $2",
        uuid.UUID(run_id),
        key,
    )
    return bool(found)


async def _wait_status(conn: asyncpg.Connection, run_id: str, status: str) -> None:
    async def reached() -> bool:
        return (await _run(conn, run_id))["status"] == status

    await wait_for(reached, timeout=10)


# -- visible: runs show, the dashboard's run JSON and timeline --------------------------------
async def test_the_reason_is_shown_in_words(
    database_url: str, conn: asyncpg.Connection, apps: Any
) -> None:
    old, _ = apps
    run_id = await _queued(database_url)
    async with serve(old):
        await old.tick()
    info = await old.get_run(run_id)
    now = await old.store.clock_now()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _print_run(info, now, full_tracebacks=False)
    text = out.getvalue()
    assert "workflow_unknown" in text
    assert "does not know workflow 'checkout'" in text
    assert "knows: legacy" in text
    assert "tries again" in text
    assert "fails after" in text
    data = run_json(info, now, None)
    [event] = [e for e in data["events"] if e["kind"] == "workflow_unknown"]
    assert event["detail"]["known"] == ["legacy"]
    assert "does not know workflow 'checkout'" in event["detail"]["message"]
    assert "workflow_unknown" in [m["kind"] for m in build(info, now).markers]


# -- the pg_cron path ---------------------------------------------------------------------
@needs_pg_cron
@needs_plpython
async def test_pg_cron_does_not_loop_hot_on_a_deferred_run(
    database_url: str, conn: asyncpg.Connection, clock: FakeClock, apps: Any
) -> None:
    from flowkeeper.pgcron import PgCron

    old, new = apps
    run_id = await _queued(database_url)
    pgcron = PgCron(database_url)
    try:
        await pgcron.install(endpoint=old.dispatcher.endpoint, signing_key=KEY, every="1m")
        async with serve(old):
            await conn.execute("CALL flowkeeper.pgcron_tick()")
            # The invocation is fire-and-forget: wait for the deferral to land.
            for _ in range(200):
                if await _events(conn, run_id, "workflow_unknown"):
                    break
                await asyncio.sleep(0.05)
            row = await _run(conn, run_id)
            assert row["status"] == "queued"
            assert row["due_in"] > 3
            assert row["dispatch_failures"] == 0
            await conn.execute("CALL flowkeeper.pgcron_tick()")
            last = json.loads(
                await conn.fetchval("SELECT last_tick::text FROM flowkeeper.pgcron_settings")
            )
            assert (last["claimed"], last["failed"]) == (0, 0)  # nothing due: no hot loop
        await pgcron.install(endpoint=new.dispatcher.endpoint, signing_key=KEY, every="1m")
        await _due_now(clock, conn, run_id)
        async with serve(new):
            await conn.execute("CALL flowkeeper.pgcron_tick()")
            assert await new.result(run_id, timeout=10) == "charged o-1, done"
        assert await _events(conn, run_id, "dispatch_failed") == []
    finally:
        with contextlib.suppress(Exception):
            await pgcron.uninstall()


# -- configuration and query loading --------------------------------------------------------
@pytest.mark.parametrize(
    "grace", [-1, timedelta(seconds=-1), math.nan, math.inf, True, "1 day", None]
)
def test_unknown_workflow_grace_is_validated(grace: Any) -> None:
    with pytest.raises(ConfigurationError, match="unknown_workflow_grace"):
        FlowKeeper("postgresql://localhost/x", signing_key=KEY, unknown_workflow_grace=grace)


def test_unknown_workflow_grace_defaults_to_a_day_and_takes_seconds() -> None:
    fk = FlowKeeper("postgresql://localhost/x", signing_key=KEY)
    assert fk.unknown_workflow_grace == timedelta(days=1)
    fk = FlowKeeper("postgresql://localhost/x", signing_key=KEY, unknown_workflow_grace=90)
    assert fk.unknown_workflow_grace == timedelta(seconds=90)


def test_named_queries_come_from_every_query_file() -> None:
    queries = load_queries("flowkeeper")
    assert "claim_run" in queries  # queries.sql
    assert "defer_unknown_workflow" in queries  # deploys.sql


def test_a_query_name_defined_in_two_files_is_an_error() -> None:
    one = "-- name: a\nSELECT 1;\n\n-- name: b\nSELECT 2;\n"
    assert parse_queries({"one.sql": one}) == {"a": "SELECT 1", "b": "SELECT 2"}
    with pytest.raises(RuntimeError, match=r"'b' is defined in both one\.sql and two\.sql"):
        parse_queries({"one.sql": one, "two.sql": "-- name: b\nSELECT 3;\n"})
    with pytest.raises(RuntimeError, match=r"'a' is defined twice in one\.sql"):
        parse_queries({"one.sql": one + "-- name: a\nSELECT 4;\n"})
