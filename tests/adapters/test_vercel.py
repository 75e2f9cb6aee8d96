"""examples/vercel served the way Vercel serves it (uvicorn, lifespan auto), and the adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import flowkeeper_vercel
import httpx
import pytest
from starlette.types import Receive, Scope, Send

from flowkeeper import ConfigurationError, FlowKeeper
from flowkeeper.endpoint import TIME_BUDGET_SCOPE_KEY
from flowkeeper.testing.postgres import free_port

from ..helpers import KEY, wait_for
from .conftest import ConnectionSampler

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "vercel"
SECRET = "cron-secret-0123456789abcdef"


def example_env(database_url: str, port: int, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLOWKEEPER_", "VERCEL")) and k not in ("CRON_SECRET", "DATABASE_URL")
    }
    env.update(
        DATABASE_URL=database_url,
        FLOWKEEPER_SIGNING_KEY=KEY,
        FLOWKEEPER_ENDPOINT=f"http://127.0.0.1:{port}/api/flowkeeper",
        CRON_SECRET=SECRET,
        VERCEL="1",
        VERCEL_ENV="production",
        CHECKOUT_REVIEW_DELAY="1",
        FLOWKEEPER_MAX_DURATION="300",
    )
    env.update(extra)
    return env


@pytest.fixture
def vercel_example(database_url: str) -> Iterator[str]:
    """examples/vercel's api/index.py under uvicorn, as Vercel's Python runtime runs it."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "api.index:app",
            "--app-dir",
            str(EXAMPLE),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--lifespan",
            "auto",
            "--log-level",
            "warning",
        ],
        cwd=EXAMPLE,
        env=example_env(database_url, port),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"the example exited with {proc.returncode}"
            try:
                httpx.get(f"{base}/api/flowkeeper/", timeout=0.5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the example did not start"
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=15)


async def test_example_completes_checkout_driven_by_vercel_cron(
    vercel_example: str, connections: ConnectionSampler
) -> None:
    async with httpx.AsyncClient(base_url=vercel_example, timeout=10) as http:
        # What Vercel Cron sends: a GET with the bearer secret.
        cron = {"authorization": f"Bearer {SECRET}", "user-agent": "vercel-cron/1.0"}
        assert (await http.get("/api/flowkeeper/tick")).status_code == 401
        wrong = await http.get("/api/flowkeeper/tick", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_secret"
        ok = await http.get("/api/flowkeeper/tick", headers=cron)
        assert ok.status_code == 200
        assert ok.json() == {"claimed": 0, "dispatched": 0, "failed": 0, "errors": {}}

        order = {"id": "o-42", "email": "ada@example.com", "amount_cents": 4200, "flaky_card": True}
        placed = await http.post("/api/orders", json=order)
        assert placed.status_code == 201, placed.text
        run_id = placed.json()["run_id"]
        again = await http.post("/api/orders", json=order)
        assert again.json() == {"run_id": run_id, "created": False}
        assert (await http.post("/api/orders", json={"id": "x"})).status_code == 422

        async def completed() -> bool:
            run = (await http.get(f"/api/orders/{run_id}")).json()
            if run["status"] in ("completed", "failed"):
                return True
            assert (await http.get("/api/flowkeeper/tick", headers=cron)).status_code == 200
            return False

        await wait_for(completed, timeout=40, interval=0.3)
        run = (await http.get(f"/api/orders/{run_id}")).json()

    assert run["status"] == "completed", run
    assert run["output"] == {
        "charge": "ch_o-42",
        "receipt": "receipt for ch_o-42 sent to ada@example.com",
        "review": "review request sent to ada@example.com",
    }
    assert [(s["key"], s["attempts"]) for s in run["steps"]] == [
        ("charge-card", 2),
        ("send-receipt", 1),
        ("wait-for-review", 1),
        ("ask-for-review", 1),
    ]
    # With no request in flight the instance holds no Postgres connection.
    # The pool closes right after the last response is sent.
    await wait_for(lambda: _none_open(connections), timeout=5)
    assert connections.peak <= 5


async def _none_open(connections: ConnectionSampler) -> bool:
    return await connections.fresh() == 0


def test_example_refuses_to_start_on_vercel_without_cron_secret(database_url: str) -> None:
    env = example_env(database_url, 1)
    del env["CRON_SECRET"]
    proc = subprocess.run(
        [sys.executable, "-c", "import api.index"],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "ConfigurationError: CRON_SECRET is not set" in proc.stderr


# the adapter on its own --------------------------------------------------------------
@pytest.fixture
def fk() -> FlowKeeper:
    # An unroutable database: nothing here may touch it.
    return FlowKeeper("postgresql://u@192.0.2.1:5432/db", signing_key=KEY, cron_secret=SECRET)


async def _budget_seen(app: Any) -> float:
    seen: dict[str, Any] = {}

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.update(scope)

    app.app = inner
    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    await app(scope, None, None)
    return float(seen[TIME_BUDGET_SCOPE_KEY])


async def test_budget_is_max_duration_minus_margin(fk: FlowKeeper) -> None:
    app = flowkeeper_vercel.app(fk, max_duration=60, safety_margin=5)
    assert await _budget_seen(app) == pytest.approx(55)


async def test_budget_follows_the_runtime_deadline(
    fk: FlowKeeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = types.ModuleType("vercel_runtime")
    runtime.get_deadline = lambda: datetime.now(UTC) + timedelta(seconds=42)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vercel_runtime", runtime)
    app = flowkeeper_vercel.app(fk, max_duration=300, safety_margin=2)
    assert await _budget_seen(app) == pytest.approx(40, abs=0.5)


def test_configuration_is_checked_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERCEL", "1")
    monkeypatch.delenv("CRON_SECRET", raising=False)
    bare = FlowKeeper("postgresql://u@192.0.2.1:5432/db", signing_key=KEY)
    with pytest.raises(ConfigurationError, match="CRON_SECRET"):
        flowkeeper_vercel.app(bare)
    assert flowkeeper_vercel.app(bare, require_cron_secret=False) is not None
    monkeypatch.setenv("FLOWKEEPER_MAX_DURATION", "five minutes")
    with pytest.raises(ConfigurationError, match="FLOWKEEPER_MAX_DURATION"):
        flowkeeper_vercel.app(bare, require_cron_secret=False)


def test_endpoint_defaults_to_the_production_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWKEEPER_ENDPOINT", raising=False)
    monkeypatch.delenv("VERCEL_PROJECT_PRODUCTION_URL", raising=False)
    assert flowkeeper_vercel.vercel_endpoint() is None
    monkeypatch.setenv("VERCEL_PROJECT_PRODUCTION_URL", "shop.example.com")
    assert flowkeeper_vercel.vercel_endpoint() == "https://shop.example.com/api/flowkeeper"
    monkeypatch.setenv("FLOWKEEPER_ENDPOINT", "https://other.example/api/flowkeeper")
    assert flowkeeper_vercel.vercel_endpoint() == "https://other.example/api/flowkeeper"


def test_vercel_json_declares_cron_and_max_duration() -> None:
    config = json.loads((EXAMPLE / "vercel.json").read_text())
    assert config["functions"]["api/index.py"]["maxDuration"] == 300
    assert {"path": "/api/flowkeeper/tick", "schedule": "* * * * *"} in config["crons"]
    requirements = (EXAMPLE / "requirements.txt").read_text()
    assert "flowkeeper-vercel" in requirements
