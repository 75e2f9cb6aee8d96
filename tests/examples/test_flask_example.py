"""examples/flask: Flask's test client, a real WSGI server for the endpoint, real Postgres.

The sync API is called from Flask's request threads (no event loop of the
caller's); the endpoint is reached over loopback through a2wsgi; the
transactional trigger commits, or rolls back, with the order row.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import asyncpg
import pytest

from flowkeeper.testing.postgres import free_port

from ..helpers import KEY
from .conftest import load_example, wsgi_server


def _wait(client: Any, run_id: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/runs/{run_id}").get_json()
        if body["status"] in ("completed", "failed", "cancelled"):
            return dict(body)
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


@pytest.fixture
def flask_app(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("FLOWKEEPER_SIGNING_KEY", KEY)
    monkeypatch.setenv("FLOWKEEPER_ENDPOINT", f"http://127.0.0.1:{port}/api/flowkeeper")

    async def orders_table() -> None:
        conn = await asyncpg.connect(database_url)
        await conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, item text NOT NULL)")
        await conn.close()

    asyncio.run(orders_table())
    module = load_example("flask", "flask_shop.app")
    with wsgi_server(module.app, port):
        yield module
    module.fk.sync.close()


def test_signup_runs_through_the_mounted_endpoint(flask_app: Any) -> None:
    client = flask_app.app.test_client()
    reply = client.post("/signup", json={"email": "ada@example.com", "name": "Ada"})
    assert reply.status_code == 201, reply.data
    run_id = reply.get_json()["run_id"]
    assert reply.get_json()["created"] is True
    body = _wait(client, run_id)
    assert body == {"status": "completed", "output": "welcome mail sent to ada@example.com"}
    # The idempotency key (the email) returns the same run.
    again = client.post("/signup", json={"email": "ada@example.com", "name": "Ada"}).get_json()
    assert again == {"run_id": run_id, "created": False}


def test_sync_api_from_many_threads_at_once(flask_app: Any) -> None:
    client = flask_app.app.test_client()
    ids: list[str] = []
    errors: list[BaseException] = []

    def sign_up(i: int) -> None:
        try:
            reply = flask_app.app.test_client().post(
                "/signup", json={"email": f"u{i}@example.com", "name": f"U{i}"}
            )
            ids.append(reply.get_json()["run_id"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sign_up, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 12
    for run_id in ids:
        assert _wait(client, run_id)["status"] == "completed"


def test_order_and_run_commit_or_roll_back_together(flask_app: Any, database_url: str) -> None:
    client = flask_app.app.test_client()
    flask_app.app.config["PROPAGATE_EXCEPTIONS"] = False
    failed = client.post("/orders", json={"item": "book", "fail": True})
    assert failed.status_code == 500

    async def counts() -> tuple[int, int]:
        conn = await asyncpg.connect(database_url)
        try:
            orders = await conn.fetchval("SELECT count(*) FROM orders")
            runs = await conn.fetchval("SELECT count(*) FROM flowkeeper.runs")
            return orders, runs
        finally:
            await conn.close()

    assert asyncio.run(counts()) == (0, 0)  # neither the order nor its run exists

    reply = client.post("/orders", json={"item": "lamp"})
    assert reply.status_code == 201, reply.data
    run_id = reply.get_json()["run_id"]
    assert asyncio.run(counts()) == (1, 1)
    # Inside a psycopg transaction nobody could push it: it is due for a driver.
    assert client.get(f"/runs/{run_id}").get_json()["status"] == "queued"

    async def tick() -> None:
        from flowkeeper import FlowKeeper

        async with FlowKeeper(
            database_url, signing_key=KEY, endpoint=flask_app.fk.dispatcher.endpoint
        ) as fk:
            await fk.tick()

    asyncio.run(tick())
    body = _wait(client, run_id)
    assert body["status"] == "completed"
    assert body["output"] == f"order {reply.get_json()['order_id']} shipped"
