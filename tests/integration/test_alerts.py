"""Failure alerts against a real local HTTP receiver (uvicorn on loopback)."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flowkeeper import Context, FailureAlert, FlowKeeper, NonRetriableError
from flowkeeper.signing import SIGNATURE_HEADER, verify_request
from flowkeeper.testing import FakeClock
from flowkeeper.testing.postgres import free_port

from ..helpers import KEY, Served, drive, make_fk, serve, wait_for


@dataclass
class Receiver:
    """A webhook receiver: records every POST, answers with the next queued status."""

    port: int = field(default_factory=free_port)
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/flowkeeper"

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
            self.received.append(json.loads(body))
            status = self.statuses.pop(0) if self.statuses else 200
            return JSONResponse({"ok": status == 200}, status_code=status)

        return Starlette(routes=[Route("/hooks/flowkeeper", hook, methods=["POST"])])

    def serve(self) -> Served:
        return Served(self.app(), self.port)


def _failing(fk: FlowKeeper, hook_calls: list[FailureAlert], *, hook_fails: int = 0) -> None:
    remaining = Counter({"fail": hook_fails})

    async def on_failure(alert: FailureAlert) -> None:
        hook_calls.append(alert)
        if remaining["fail"] > 0:
            remaining["fail"] -= 1
            raise RuntimeError("pager service down")

    def charge() -> None:
        raise NonRetriableError("card <declined> & blocked")

    @fk.workflow("checkout", on_failure=on_failure)
    async def checkout(ctx: Context, order_id: str) -> None:
        await ctx.step("charge-card", charge)


async def _alert_rows(conn: asyncpg.Connection, run_id: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT attempts, done, outcome, last_error, due_at FROM flowkeeper.alerts "
        "WHERE run_id = $1",
        uuid.UUID(run_id),
    )


async def _events(fk: FlowKeeper, run_id: str, prefix: str = "alert_") -> list[str]:
    return [e.kind for e in (await fk.get_run(run_id)).events if e.kind.startswith(prefix)]


async def test_failed_run_posts_a_signed_slack_compatible_alert_and_calls_the_hook(
    database_url: str, conn: asyncpg.Connection
) -> None:
    receiver = Receiver()
    fk = make_fk(
        database_url, alert_webhook=receiver.url, dashboard_password="alerts-test-password"
    )
    hooks: list[FailureAlert] = []
    _failing(fk, hooks)
    try:
        async with receiver.serve(), serve(fk):
            run_id = (await fk.trigger("checkout", "o-1", idempotency_key="o-1")).run_id
            assert (await drive(fk, [run_id]))[run_id] == "failed"
            await wait_for(lambda: _settled(conn, run_id))
    finally:
        await fk.aclose()
    assert len(receiver.received) == 1
    body = receiver.received[0]
    assert body["event"] == "run.failed"
    assert body["run_id"] == run_id and body["workflow"] == "checkout"
    assert body["error"]["step"] == "charge-card"
    assert body["error"]["message"] == "card <declined> & blocked"
    assert body["idempotency_key"] == "o-1"
    assert body["url"] == f"{fk.dispatcher.endpoint}/ui/runs/{run_id}"  # type: ignore[union-attr]
    # Slack's text: mrkdwn with its escaping, and a link to the run.
    assert "card &lt;declined&gt; &amp; blocked" in body["text"]
    assert f"<{body['url']}|Open run {run_id}>" in body["text"]
    # Signed like an invocation, over the webhook's path.
    verify_request(
        KEY,
        method="POST",
        paths=["/hooks/flowkeeper"],
        body=receiver.bodies[0],
        header=receiver.headers[0][SIGNATURE_HEADER.lower()],
    )
    assert [h.run_id for h in hooks] == [run_id]
    assert hooks[0].error_type.endswith("NonRetriableError")
    assert hooks[0].input == "o-1" and hooks[0].attempt == 1
    rows = await _alert_rows(conn, run_id)
    assert [(r["outcome"], sorted(r["done"]), r["attempts"]) for r in rows] == [
        ("delivered", ["hook", "webhook"], 1)
    ]
    assert await _events(fk, run_id) == ["alert_sent"]


async def _settled(conn: asyncpg.Connection, run_id: str) -> bool:
    rows = await _alert_rows(conn, run_id)
    return bool(rows) and all(r["outcome"] is not None for r in rows)


async def test_receiver_down_never_blocks_the_run_and_the_tick_retries(
    database_url: str, conn: asyncpg.Connection
) -> None:
    receiver = Receiver()  # not started yet: connection refused
    fk = make_fk(database_url, alert_webhook=receiver.url)
    hooks: list[FailureAlert] = []
    _failing(fk, hooks)
    clock = await FakeClock(conn).install()
    try:
        async with serve(fk):
            run_id = (await fk.trigger("checkout", "o-2")).run_id
            assert (await drive(fk, [run_id]))[run_id] == "failed"
            await wait_for(lambda: _attempted(conn, run_id, 1))
            rows = await _alert_rows(conn, run_id)
            assert rows[0]["outcome"] is None and rows[0]["done"] == ["hook"]
            assert "ConnectError" in rows[0]["last_error"]
            assert await _events(fk, run_id) == ["alert_failed"]

            await fk.tick()  # not due yet (backoff): nothing sent, no attempt counted
            assert (await _alert_rows(conn, run_id))[0]["attempts"] == 1

            async with receiver.serve():
                await clock.advance(60)
                await fk.tick()
                await fk.tick()  # settled: a second tick sends nothing more
    finally:
        await fk.aclose()
    assert [b["run_id"] for b in receiver.received] == [run_id]
    assert len(hooks) == 1  # the hook took it the first time: never called again
    rows = await _alert_rows(conn, run_id)
    assert (rows[0]["outcome"], rows[0]["attempts"]) == ("delivered", 2)
    assert await _events(fk, run_id) == ["alert_failed", "alert_sent"]


async def _attempted(conn: asyncpg.Connection, run_id: str, n: int) -> bool:
    rows = await _alert_rows(conn, run_id)
    return bool(rows) and rows[0]["attempts"] >= n and rows[0]["last_error"] is not None


async def test_error_answers_and_a_failing_hook_are_retried_separately(
    database_url: str, conn: asyncpg.Connection
) -> None:
    receiver = Receiver(statuses=[500])
    fk = make_fk(database_url, alert_webhook=receiver.url)
    hooks: list[FailureAlert] = []
    _failing(fk, hooks, hook_fails=2)
    clock = await FakeClock(conn).install()
    try:
        async with receiver.serve(), serve(fk):
            run_id = (await fk.trigger("checkout", "o-3")).run_id
            await drive(fk, [run_id])
            await wait_for(lambda: _attempted(conn, run_id, 1))
            row = (await _alert_rows(conn, run_id))[0]
            assert row["done"] == []
            assert "webhook: HTTP 500" in row["last_error"]
            assert "hook: RuntimeError: pager service down" in row["last_error"]
            await clock.advance(60)
            await fk.tick()  # webhook now 200, hook fails once more
            row = (await _alert_rows(conn, run_id))[0]
            assert row["done"] == ["webhook"] and row["outcome"] is None
            await clock.advance(120)
            await fk.tick()
    finally:
        await fk.aclose()
    assert len(receiver.received) == 2  # the 500, then the one that was taken
    assert [h.attempt for h in hooks] == [1, 2, 3]
    row = (await _alert_rows(conn, run_id))[0]
    assert (row["outcome"], sorted(row["done"])) == ("delivered", ["hook", "webhook"])


async def test_an_undeliverable_alert_is_abandoned_after_its_attempts(
    database_url: str, conn: asyncpg.Connection
) -> None:
    receiver = Receiver()  # never started
    fk = make_fk(database_url, alert_webhook=receiver.url)
    fk.alerts.max_attempts = 2
    _failing(fk, [])
    clock = await FakeClock(conn).install()
    try:
        async with serve(fk):
            run_id = (await fk.trigger("checkout", "o-4")).run_id
            await drive(fk, [run_id])
            await wait_for(lambda: _attempted(conn, run_id, 1))
            await clock.advance(60)
            await fk.tick()
    finally:
        await fk.aclose()
    row = (await _alert_rows(conn, run_id))[0]
    assert (row["outcome"], row["attempts"], row["due_at"]) == ("abandoned", 2, None)
    assert await _events(fk, run_id) == ["alert_failed", "alert_abandoned"]
    assert (await fk.get_run(run_id)).status == "failed"


async def test_a_process_without_the_workflow_sends_the_webhook_and_leaves_the_hook(
    database_url: str, conn: asyncpg.Connection
) -> None:
    receiver = Receiver()
    app = make_fk(database_url)  # the app: executes runs, has the hook, no webhook here
    hooks: list[FailureAlert] = []
    _failing(app, hooks)
    # A bare cron process (`flowkeeper tick` without --app): knows no workflow.
    cron = make_fk(database_url, port=app.test_port, alert_webhook=receiver.url)  # type: ignore[attr-defined]
    try:
        # Pretend the app died right after failing the run: its delivery never ran.
        app.alerts.after_failure = _nothing  # type: ignore[method-assign]
        async with serve(app):
            run_id = (await app.trigger("checkout", "o-5")).run_id
            # No ticks here: a tick of the app would deliver the alert itself.
            await wait_for(lambda: _failed(app, run_id))
        async with receiver.serve():
            await cron.tick()
        row = (await _alert_rows(conn, run_id))[0]
        assert row["done"] == ["webhook"] and row["outcome"] is None
        assert "not registered" in row["last_error"]
        assert hooks == []
        # A process that registers the workflow finishes the job.
        await conn.execute(
            "UPDATE flowkeeper.alerts SET due_at = now() WHERE run_id = $1", uuid.UUID(run_id)
        )
        await app.alerts.deliver_due()
    finally:
        await cron.aclose()
        await app.aclose()
    assert len(receiver.received) == 1
    assert [h.run_id for h in hooks] == [run_id]
    assert (await _alert_rows(conn, run_id))[0]["outcome"] == "delivered"


async def _nothing(run_id: str) -> None:
    return None


async def test_no_destination_settles_quietly(database_url: str, conn: asyncpg.Connection) -> None:
    fk = make_fk(database_url)

    @fk.workflow("plain")
    async def plain(ctx: Context) -> None:
        raise ValueError("boom")

    try:
        async with serve(fk):
            run_id = (await fk.trigger("plain")).run_id
            await drive(fk, [run_id])
            await wait_for(lambda: _settled(conn, run_id))
    finally:
        await fk.aclose()
    assert await _events(fk, run_id) == []
    assert (await _alert_rows(conn, run_id))[0]["outcome"] == "delivered"


def test_bad_webhook_url_is_refused() -> None:
    from flowkeeper import ConfigurationError

    with pytest.raises(ConfigurationError, match="FLOWKEEPER_ALERT_WEBHOOK"):
        FlowKeeper("postgresql://x/y", signing_key=KEY, alert_webhook="slack.example/hook")


async def _failed(fk: FlowKeeper, run_id: str) -> bool:
    return (await fk.get_run(run_id)).status == "failed"
