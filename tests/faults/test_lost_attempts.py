"""A step that kills its process is retried per its policy, then fails; never for ever.

Each invocation runs in a process of its own (``tests/apps/lost.py``); the step
ends that process with ``os._exit`` or SIGKILL, mid-step.  The next invocation,
after the lease has expired, must count the lost attempt; after the retry
policy's three attempts the run fails with an AttemptLostError and the step
body has run exactly three times.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg
import pytest

from flowkeeper import FlowKeeper
from tests.apps import lost
from tests.helpers import KEY

from .conftest import ROOT
from .summary import record

LEASE = 0.5


async def invoke_in_a_process(database_url: str, run_id: str) -> int:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "FLOWKEEPER_SIGNING_KEY": KEY,
        "FAULT_LEASE": str(LEASE),
        "PYTHONPATH": str(ROOT),
    }
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tests.apps.lost", run_id],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    return proc.returncode


async def drive(database_url: str, fk: FlowKeeper, run_id: str, most: int = 10) -> list[int]:
    """Invoke the run, one process each, until it ends; the exit codes."""
    codes: list[int] = []
    for _ in range(most):
        codes.append(await invoke_in_a_process(database_url, run_id))
        if (await fk.get_run(run_id)).status.value in ("completed", "failed"):
            return codes
        await asyncio.sleep(LEASE + 0.2)  # until the dead invocation's lease is over
    raise AssertionError(f"run {run_id} never ended: exit codes {codes}")


@pytest.fixture
async def fk(database_url: str, conn: asyncpg.Connection) -> FlowKeeper:
    await conn.execute(lost.SCHEMA_SQL)
    instance = FlowKeeper(database_url, signing_key=KEY)
    instance.workflow("lost")(lost.lost)
    return instance


@pytest.mark.parametrize("how", ["exit", "sigkill", "sync"])
async def test_a_step_that_kills_its_process_fails_after_its_attempts(
    database_url: str, conn: asyncpg.Connection, fk: FlowKeeper, how: str
) -> None:
    handle = await fk.trigger("lost", {"how": how})
    codes = await drive(database_url, fk, handle.run_id)
    key = "deadly-sync" if how == "sync" else "deadly"
    executions = await conn.fetchval(
        "SELECT count(*) FROM lost_log WHERE run_id = $1 AND key = $2", handle.run_id, key
    )
    assert executions == 3  # the policy's max_attempts, not one per lease expiry for ever
    assert len(codes) == 4 and all(c != 0 for c in codes[:3]) and codes[3] == 0
    info = await fk.get_run(handle.run_id)
    assert info.status.value == "failed"
    assert info.error is not None
    assert info.error["type"] == "flowkeeper.errors.AttemptLostError"
    assert "invocation ended" in info.error["message"]
    step = {s.key: s for s in info.steps}[key]
    assert step.status == "failed" and step.attempts == 3
    assert [a.attempt for a in step.failed_attempts] == [1, 2, 3]
    assert {a.error_type for a in step.failed_attempts} == {"flowkeeper.errors.AttemptLostError"}
    assert {s.key: s.attempts for s in info.steps}["before"] == 1  # recorded: never again
    record(lost_attempt_runs=1, lost_attempts_counted=3)
    await fk.aclose()


async def test_a_step_that_dies_twice_then_succeeds_completes_on_attempt_three(
    database_url: str, conn: asyncpg.Connection, fk: FlowKeeper
) -> None:
    handle = await fk.trigger("lost", {"how": "exit", "survive_after": 2})
    await drive(database_url, fk, handle.run_id)
    info = await fk.get_run(handle.run_id)
    assert info.status.value == "completed", info.error
    assert info.output == "survived on execution 3"
    step = {s.key: s for s in info.steps}["deadly"]
    assert step.attempts == 3
    assert [a.attempt for a in step.failed_attempts] == [1, 2]
    await fk.aclose()


async def test_a_stream_goes_on_after_its_process_died_and_marks_the_lost_attempt(
    database_url: str, conn: asyncpg.Connection, fk: FlowKeeper
) -> None:
    handle = await fk.trigger("lost", {"how": "stream"})
    await drive(database_url, fk, handle.run_id)
    info = await fk.get_run(handle.run_id)
    assert info.status.value == "completed", info.error
    messages = [m async for m in fk.stream(handle.run_id)]
    assert [(m.data["execution"], m.attempt, m.finality) for m in messages] == [
        (1, 1, "superseded"),  # published by the attempt that died with its process
        (2, 2, "final"),
    ]
    assert messages[0].data["pid"] != messages[1].data["pid"]
    final = [m async for m in fk.stream(handle.run_id, final_only=True)]
    assert [m.data["execution"] for m in final] == [2]
    await fk.aclose()
