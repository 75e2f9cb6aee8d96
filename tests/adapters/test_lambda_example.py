"""examples/aws-lambda: its SAM template lints, and its handler runs the checkout to the end."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flowkeeper import FlowKeeper

from ..helpers import KEY, wait_for
from . import lambda_events
from .conftest import ConnectionSampler
from .fake_lambda import FUNCTION_NAME, FakeLambda

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "aws-lambda"


def test_sam_template_passes_cfn_lint() -> None:
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    proc = subprocess.run(
        [str(cfn_lint), str(EXAMPLE / "template.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


async def test_example_handler_runs_checkout_to_completion(
    database_url: str, monkeypatch: pytest.MonkeyPatch, connections: ConnectionSampler
) -> None:
    # What template.yaml and Lambda put in the environment.
    monkeypatch.delenv("FLOWKEEPER_ENDPOINT", raising=False)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("FLOWKEEPER_SIGNING_KEY", KEY)
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", FUNCTION_NAME)
    monkeypatch.setenv("CHECKOUT_REVIEW_DELAY", "1")
    fake: FakeLambda

    def init() -> Any:  # each environment imports the module afresh
        module = runpy.run_path(str(EXAMPLE / "src" / "app.py"), run_name="app")
        handler = module["handler"]
        handler.fk.dispatcher.lambda_client = fake.client()  # boto3's place
        return handler

    fake = FakeLambda(init, timeout=900)
    order = {"id": "o-7", "email": "grace@example.com", "amount_cents": 1999, "flaky_card": True}
    async with fake, FlowKeeper(database_url, signing_key=KEY) as fk:
        placed = await fake.invoke(
            lambda_events.function_url(
                "POST",
                "/api/orders",
                {"content-type": "application/json"},
                json.dumps(order).encode(),
            )
        )
        assert placed["statusCode"] == 201, placed
        run_id = json.loads(placed["body"])["run_id"]

        async def done() -> bool:
            if (await fk.get_run(run_id)).status.is_finished:
                return True
            await fake.invoke(lambda_events.scheduler_input())
            return False

        await wait_for(done, timeout=40, interval=0.4)
        await fake.drain()
        shown = await fake.invoke(
            lambda_events.function_url("GET", f"/api/orders/{run_id}", {}, b"")
        )
    run = json.loads(shown["body"])
    assert run["status"] == "completed", run
    # The stand-in card network fails once per environment, so at least one retry.
    assert run["steps"][0]["key"] == "charge-card" and run["steps"][0]["attempts"] >= 2
    assert [(s["key"], s["attempts"]) for s in run["steps"][1:]] == [
        ("send-receipt", 1),
        ("wait-for-review", 1),
        ("ask-for-review", 1),
    ]
    assert not fake.errors
    assert await connections.fresh() == 0
