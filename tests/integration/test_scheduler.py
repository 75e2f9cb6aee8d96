"""The tick: concurrent ticks never double-dispatch, refused dispatches come back later.

Invocations are counted as they arrive at a real uvicorn (``CountingApp``), so a
run sent twice shows up even when the endpoint would refuse the second one.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from flowkeeper import Context, FlowKeeper
from flowkeeper.scheduler import PROBE_RUN_ID, Scheduler
from flowkeeper.signing import sign_request
from flowkeeper.testing import FakeClock
from flowkeeper.testing.postgres import free_port

from ..helpers import KEY, Served, make_fk, serve, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CountingApp:
    """Wraps an ASGI app and counts the run ids of the invocations that arrive.

    The scheduler loop's start-up probe (a run id that cannot exist) is not counted.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.arrivals: collections.Counter[str] = collections.Counter()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            if not message.get("more_body"):
                break
        body = b"".join(m.get("body", b"") for m in messages)
        if scope["path"].rstrip("/").endswith("flowkeeper"):
            run_id = json.loads(body)["run_id"]
            if run_id != PROBE_RUN_ID:
                self.arrivals[run_id] += 1
        replay = iter(messages)

        async def receive_again() -> Any:
            return next(replay)

        return await self.app(scope, receive_again, send)


async def insert_due_runs(conn: asyncpg.Connection, workflow: str, count: int) -> list[str]:
    """``count`` queued runs, due now, nobody pushing them (as a bulk import would)."""
    rows = await conn.fetch(
        """INSERT INTO flowkeeper.runs (id, workflow, status, input, due_at)
           SELECT gen_random_uuid(), $1, 'queued', to_jsonb(i), flowkeeper.clock_now()
           FROM generate_series(1, $2) AS i
           RETURNING id""",
        workflow,
        count,
    )
    return [str(r["id"]) for r in rows]


def _register_echo(fk: FlowKeeper) -> None:
    @fk.workflow("echo")
    async def echo(ctx: Context, n: int) -> int:
        return n


async def _all_completed(conn: asyncpg.Connection, count: int) -> bool:
    done = await conn.fetchval("SELECT count(*) FROM flowkeeper.runs WHERE status = 'completed'")
    return done == count


# concurrency -------------------------------------------------------------------------------
@pytest.mark.slow
async def test_eight_concurrent_ticks_dispatch_each_of_2000_runs_once(
    database_url: str, conn: asyncpg.Connection
) -> None:
    serving = make_fk(database_url, pool_size=8)
    _register_echo(serving)
    counting = CountingApp(serving.asgi())
    endpoint = serving.dispatcher.endpoint  # type: ignore[union-attr]
    tickers = [make_fk(database_url, endpoint=endpoint) for _ in range(8)]
    try:
        ids = await insert_due_runs(conn, "echo", 2000)
        # Pools and schema checks ready first, so that the ticks' claims really overlap.
        await asyncio.gather(*(t.store.clock_now() for t in tickers))
        async with serve(serving, counting):
            schedulers = [
                Scheduler(t.store, t.dispatcher, batch_size=50, concurrency=8)  # type: ignore[arg-type]
                for t in tickers
            ]
            results = await asyncio.gather(*(s.tick() for s in schedulers))
            await wait_for(lambda: _all_completed(conn, 2000), timeout=120)
        assert sum(r.claimed for r in results) == 2000
        assert sum(r.dispatched for r in results) == 2000
        assert all(r.failed == 0 for r in results)
        # Several ticks really ran at once and shared the work.
        assert sum(1 for r in results if r.claimed) >= 4
        assert sum(counting.arrivals.values()) == 2000
        assert set(counting.arrivals) == set(ids)
        assert max(counting.arrivals.values()) == 1
        assert await conn.fetchval("SELECT max(invocations) FROM flowkeeper.runs") == 1
    finally:
        for t in tickers:
            await t.aclose()
        await serving.aclose()


async def test_a_run_under_a_live_lease_is_not_dispatched_again(
    database_url: str, conn: asyncpg.Connection
) -> None:
    fk = make_fk(database_url)
    _register_echo(fk)
    try:
        await insert_due_runs(conn, "echo", 3)
        rows = await fk.store.claim_due(10, fk.dispatch_lease)  # another tick holds them
        assert len(rows) == 3
        assert (await fk.tick()).claimed == 0
        clock = await FakeClock(conn).install()
        await clock.advance(fk.dispatch_lease.total_seconds() + 1)  # that tick died
        async with serve(fk):
            result = await fk.tick()
            await wait_for(lambda: _all_completed(conn, 3))
        assert result.claimed == result.dispatched == 3
    finally:
        await fk.aclose()


# refused dispatches ------------------------------------------------------------------------
async def _boom(request: Any) -> Any:
    raise RuntimeError("the app crashed")


def _refusing_app(kind: str, fk: FlowKeeper) -> Any:
    if kind == "401":
        other = make_fk(
            fk.store.db.url, signing_key="another-signing-key-0123456789abcdef", port=fk.test_port
        )  # type: ignore[attr-defined]
        return other.asgi()
    if kind == "404":
        return Starlette(routes=[Route("/", lambda r: PlainTextResponse("home"))])
    if kind == "5xx":
        return Starlette(routes=[Route("/api/flowkeeper/", _boom, methods=["POST"])])
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("401", "HTTP 401: Invalid signature"),
        ("404", "HTTP 404 from http://127.0.0.1"),
        ("5xx", "HTTP 500: Internal Server Error"),
        ("refused", "ConnectError"),
    ],
)
async def test_refused_dispatch_is_logged_backed_off_recorded_then_retried(
    database_url: str,
    conn: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    reason: str,
) -> None:
    clock = await FakeClock(conn).install()
    fk = make_fk(database_url)
    _register_echo(fk)
    try:
        ids = await insert_due_runs(conn, "echo", 4)
        caplog.set_level(logging.WARNING, logger="flowkeeper")
        if kind == "refused":
            result = await fk.tick()
        else:
            async with Served(_refusing_app(kind, fk), fk.test_port):  # type: ignore[attr-defined]
                result = await fk.tick()
        assert (result.claimed, result.dispatched, result.failed) == (4, 0, 4)
        assert len(result.errors) == 1
        assert next(iter(result.errors)).startswith(reason)
        assert any(reason in r.getMessage() for r in caplog.records)

        rows = await conn.fetch(
            "SELECT lease_token, dispatch_failures, "
            "extract(epoch FROM due_at - flowkeeper.clock_now()) AS wait FROM flowkeeper.runs"
        )
        assert all(r["lease_token"] is None for r in rows)
        assert all(r["dispatch_failures"] == 1 for r in rows)
        assert all(0 < r["wait"] <= 2.4 for r in rows), [r["wait"] for r in rows]
        info = await fk.get_run(ids[0])
        events = [e for e in info.events if e.kind == "dispatch_failed"]
        assert len(events) == 1
        assert events[0].detail is not None
        assert events[0].detail["reason"].startswith(reason)
        assert events[0].detail["failures"] == 1
        assert 1.6 <= events[0].detail["retry_in"] <= 2.4  # 2 s, jittered by 20 %

        assert (await fk.tick()).claimed == 0  # backed off: no spinning
        await clock.advance(3)
        async with serve(fk):
            again = await fk.tick()
            await wait_for(lambda: _all_completed(conn, 4))
        assert again.dispatched == 4
    finally:
        await fk.aclose()


async def test_repeated_failures_back_off_exponentially_with_few_events(
    database_url: str, conn: asyncpg.Connection
) -> None:
    clock = await FakeClock(conn).install()
    fk = make_fk(database_url)  # nobody serves its endpoint
    try:
        [run_id] = await insert_due_runs(conn, "echo", 1)
        waits = []
        for _ in range(10):
            assert (await fk.tick()).failed == 1
            wait = await conn.fetchval(
                "SELECT extract(epoch FROM due_at - flowkeeper.clock_now())::float8 "
                "FROM flowkeeper.runs"
            )
            waits.append(wait)
            await clock.advance(wait + 0.01)
        assert waits[0] < waits[3] < waits[6]
        assert 230 <= waits[-1] <= 360  # capped at 5 minutes, jittered by 20 %
        kinds = [e.kind for e in (await fk.get_run(run_id)).events]
        assert kinds.count("dispatch_failed") == 4  # failures 1, 2, 4, 8
    finally:
        await fk.aclose()


async def test_an_unreachable_endpoint_stops_the_tick_early(
    database_url: str, conn: asyncpg.Connection
) -> None:
    fk = make_fk(database_url)
    try:
        await insert_due_runs(conn, "echo", 500)
        scheduler = Scheduler(fk.store, fk.dispatcher, batch_size=100, concurrency=4)  # type: ignore[arg-type]
        result = await scheduler.tick()
        assert scheduler.breaker == 16
        assert 16 <= result.failed < 30
        assert result.claimed <= 100
        counts = await conn.fetchrow(
            """SELECT count(*) FILTER (WHERE dispatch_failures = 1) AS backed_off,
                      count(*) FILTER (WHERE dispatch_failures = 0 AND lease_token IS NULL
                                       AND due_at <= flowkeeper.clock_now()) AS due,
                      count(*) FILTER (WHERE lease_token IS NOT NULL) AS leased
               FROM flowkeeper.runs"""
        )
        # Claimed but never sent: released for the next tick, not stuck behind a lease.
        assert counts["backed_off"] == result.failed
        assert counts["due"] == 500 - result.failed
        assert counts["leased"] == 0
    finally:
        await fk.aclose()


async def test_stopping_a_tick_releases_what_it_has_not_sent(
    database_url: str, conn: asyncpg.Connection
) -> None:
    arrived = asyncio.Event()

    async def slow_ack(request: Any) -> Any:
        data = json.loads(await request.body())
        arrived.set()
        await asyncio.sleep(0.3)
        return JSONResponse({"run_id": data["run_id"], "accepted": True}, status_code=202)

    fk = make_fk(database_url)
    app = Starlette(routes=[Route("/api/flowkeeper/", slow_ack, methods=["POST"])])
    stop = asyncio.Event()
    try:
        await insert_due_runs(conn, "echo", 10)
        scheduler = Scheduler(fk.store, fk.dispatcher, batch_size=10, concurrency=2)  # type: ignore[arg-type]
        async with Served(app, fk.test_port):  # type: ignore[attr-defined]
            ticking = asyncio.create_task(scheduler.tick(stop=stop))
            await asyncio.wait_for(arrived.wait(), 10)
            stop.set()
            result = await ticking
        assert result.claimed == 10
        assert result.dispatched == 2  # the two in flight finished
        released = await conn.fetchval(
            "SELECT count(*) FROM flowkeeper.runs "
            "WHERE lease_token IS NULL AND due_at <= flowkeeper.clock_now()"
        )
        assert released == 8
    finally:
        await fk.aclose()


async def test_tick_time_limit_and_max_runs(database_url: str, conn: asyncpg.Connection) -> None:
    fk = make_fk(database_url)
    _register_echo(fk)
    try:
        await insert_due_runs(conn, "echo", 30)
        assert (await fk.tick(time_limit=0)).claimed == 0
        async with serve(fk):
            assert (await fk.tick(max_runs=7)).dispatched == 7
            assert (await fk.tick()).dispatched == 23
    finally:
        await fk.aclose()


async def test_probe_checks_reachability_key_and_database(database_url: str) -> None:
    fk = make_fk(database_url)
    scheduler = Scheduler(fk.store, fk.dispatcher)  # type: ignore[arg-type]
    wrong = make_fk(
        database_url, signing_key="another-signing-key-0123456789abcdef", port=fk.test_port
    )  # type: ignore[attr-defined]
    try:
        assert "ConnectError" in (await scheduler.probe()).reason
        async with serve(fk):
            assert (await scheduler.probe()).delivered
        async with serve(wrong):
            probe = await scheduler.probe()
        assert not probe.delivered
        assert probe.reason.startswith("HTTP 401")
    finally:
        await fk.aclose()
        await wrong.aclose()


# the /tick route ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "auth", "status"),
    [
        ("GET", "bearer", 200),  # Vercel Cron: GET with Authorization: Bearer <CRON_SECRET>
        ("POST", "bearer", 200),
        ("POST", "signed", 200),
        ("GET", "signed", 200),
        ("GET", "wrong-bearer", 401),
        ("GET", "none", 401),
        ("GET", "basic", 401),
        ("POST", "signed-other-path", 401),
    ],
)
async def test_tick_route_authentication(
    database_url: str, conn: asyncpg.Connection, method: str, auth: str, status: int
) -> None:
    fk = make_fk(database_url, cron_secret="cron-secret-123")
    _register_echo(fk)
    try:
        await insert_due_runs(conn, "echo", 3)
        headers: dict[str, str] = {}
        if auth == "bearer":
            headers["Authorization"] = "Bearer cron-secret-123"
        elif auth == "wrong-bearer":
            headers["Authorization"] = "Bearer guess"
        elif auth == "basic":
            headers["Authorization"] = "Basic Y3Jvbjpjcm9uLXNlY3JldC0xMjM="
        elif auth.startswith("signed"):
            path = "/api/flowkeeper/" if auth == "signed-other-path" else "/api/flowkeeper/tick"
            headers.update(sign_request(KEY, method=method, path=path, body=b""))
        async with serve(fk) as server, httpx.AsyncClient() as client:
            response = await client.request(
                method, f"{server.base_url}/api/flowkeeper/tick", headers=headers
            )
            assert response.status_code == status, response.text
            if status == 200:
                assert response.json() == {"claimed": 3, "dispatched": 3, "failed": 0, "errors": {}}
                await wait_for(lambda: _all_completed(conn, 3))
            else:
                assert response.json()["error"]["message"]
                assert (
                    await conn.fetchval(
                        "SELECT count(*) FROM flowkeeper.runs WHERE lease_token IS NULL"
                    )
                    == 3
                )
    finally:
        await fk.aclose()


async def test_tick_route_stops_sending_before_the_hosts_deadline(
    database_url: str, conn: asyncpg.Connection
) -> None:
    async def one_second_ack(request: Any) -> Any:
        data = json.loads(await request.body())
        await asyncio.sleep(1.0)
        return JSONResponse({"run_id": data["run_id"], "accepted": True}, status_code=202)

    # Invocations go to an endpoint that takes 1 s to answer each; the /tick route is
    # served by a host that leaves the request 5 s: 5 - ack timeout (10 s) - 1 s is
    # floored at 1 s of sending, then the tick returns and releases the rest.
    slow = make_fk(database_url)
    fk = make_fk(database_url, cron_secret="s", endpoint=slow.dispatcher.endpoint)  # type: ignore[union-attr]
    tick_port = free_port()
    tick_app = fk.asgi(time_budget=lambda scope: 5.0)
    slow_app = Starlette(routes=[Route("/api/flowkeeper/", one_second_ack, methods=["POST"])])
    try:
        await insert_due_runs(conn, "echo", 100)
        async with (
            Served(slow_app, slow.test_port),  # type: ignore[attr-defined]
            Served(tick_app, tick_port),
            httpx.AsyncClient() as client,
        ):
            started = time.monotonic()
            response = await client.get(
                f"http://127.0.0.1:{tick_port}/api/flowkeeper/tick",
                headers={"Authorization": "Bearer s"},
                timeout=30,
            )
            took = time.monotonic() - started
        assert response.status_code == 200
        body = response.json()
        assert body["claimed"] == 100
        assert body["dispatched"] == 32  # the first wave (concurrency 32), then time was up
        assert took < 4
        released = await conn.fetchval(
            "SELECT count(*) FROM flowkeeper.runs "
            "WHERE lease_token IS NULL AND due_at <= flowkeeper.clock_now()"
        )
        assert released == 68
    finally:
        await fk.aclose()
        await slow.aclose()


# flowkeeper tick -----------------------------------------------------------------------------
def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from flowkeeper.cli import main; sys.exit(main())",
            *args,
        ],
        env={**os.environ, "PYTHONPATH": ROOT, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cli_tick_exit_codes_and_messages(
    database_url: str, conn: asyncpg.Connection
) -> None:
    fk = make_fk(database_url)
    _register_echo(fk)
    env = {
        "DATABASE_URL": database_url,
        "FLOWKEEPER_SIGNING_KEY": KEY,
        "FLOWKEEPER_ENDPOINT": fk.dispatcher.endpoint,  # type: ignore[union-attr]
    }
    try:
        # Database unreachable: exit 1, and it says where and what to check.
        dead_db = {**env, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x"}
        proc = await asyncio.to_thread(_cli, "tick", env=dead_db)
        assert proc.returncode == 1
        assert "Cannot connect to Postgres" in proc.stderr
        assert "DATABASE_URL" in proc.stderr

        # Endpoint unreachable with runs due: exit 3; the runs stay due with a backoff.
        await insert_due_runs(conn, "echo", 2)
        proc = await asyncio.to_thread(_cli, "tick", env=env)
        assert proc.returncode == 3, proc.stderr
        assert "claimed 2, dispatched 0, failed 2" in proc.stdout
        assert "could not be delivered" in proc.stderr
        assert "2 x ConnectError" in proc.stderr
        proc = await asyncio.to_thread(_cli, "tick", "--check", env=env)
        assert proc.returncode == 3
        assert "failed the check" in proc.stderr

        await conn.execute("UPDATE flowkeeper.runs SET due_at = flowkeeper.clock_now()")
        async with serve(fk):
            proc = await asyncio.to_thread(_cli, "tick", "--check", env=env)
            assert proc.returncode == 0, proc.stderr
            assert "signing key accepted" in proc.stdout
            assert "claimed 2, dispatched 2, failed 0" in proc.stdout
            await wait_for(lambda: _all_completed(conn, 2))
        # No signing key: a configuration error, exit 1.
        proc = await asyncio.to_thread(_cli, "tick", env={**env, "FLOWKEEPER_SIGNING_KEY": ""})
        assert proc.returncode == 1
        assert "FLOWKEEPER_SIGNING_KEY" in proc.stderr
    finally:
        await fk.aclose()


async def test_claim_uses_the_due_index(database_url: str, conn: asyncpg.Connection) -> None:
    """A tick reads due runs through runs_due_idx, never by scanning every live run."""
    await conn.execute(
        """INSERT INTO flowkeeper.runs (id, workflow, status, due_at)
           SELECT gen_random_uuid(), 'w', 'sleeping', now() + interval '1 day'
           FROM generate_series(1, 20000)"""
    )
    await conn.execute("ANALYZE flowkeeper.runs")
    from flowkeeper.sql import load_queries

    plan = await conn.fetchval(
        "EXPLAIN (FORMAT JSON) " + load_queries("flowkeeper")["claim_due"],
        200,
        __import__("datetime").timedelta(seconds=30),
    )
    text = json.dumps(plan)
    assert "runs_due_idx" in text
    assert "Seq Scan" not in text
