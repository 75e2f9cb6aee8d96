"""The workload the fault tests share: crashy runs, a tolerant ticker, the final check.

Runs of ``tests/apps/crashy.py`` log every step execution into ``fault_log``
with whether that step's result was already recorded; :func:`check_runs`
turns the database's final state into the guarantees: every run finished
(crashy's steps fail only while something is down, and are retried, so
finished means completed), no recorded step ran again, every step recorded
exactly once and executed at least once, every output right.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg

from flowkeeper import FlowKeeper
from tests.apps import crashy

from .summary import record

FINISHED = ("completed", "failed", "cancelled")


@dataclass
class Checked:
    runs: int
    executions: int
    repeated_before_recording: int
    reexecuted: int
    lost: int


@contextlib.asynccontextmanager
async def ticking(fk: FlowKeeper, interval: float = 0.2) -> AsyncIterator[None]:
    """Tick in the background, as a cron would, riding out endpoint and database outages."""
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # the endpoint or Postgres may be down now
                await fk.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        await task


async def wait_finished(
    database_url: str, ids: Sequence[str], *, timeout: float = 120, interval: float = 0.2
) -> None:
    """Poll until every run has finished; reconnects, as Postgres itself may restart."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(database_url, timeout=5)
            try:
                done = await conn.fetchval(
                    "SELECT count(*) FROM flowkeeper.runs WHERE id = ANY($1::uuid[]) "
                    "AND status = ANY($2::text[])",
                    list(ids),
                    list(FINISHED),
                )
            finally:
                await conn.close()
            if done == len(ids):
                return
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass
        await asyncio.sleep(interval)
    # The final check reports which runs are stuck and in what state.


async def check_runs(
    conn: asyncpg.Connection,
    ids: Sequence[str],
    *,
    steps: int = crashy.STEPS,
    **counts: int,
) -> Checked:
    """Check the guarantees over the crashy runs ``ids`` (inputs 0..n-1).

    The figures go into the suite's summary (with the test's own ``counts``,
    e.g. ``kills_injected=``) before anything is asserted, so a failing run
    still shows what was lost.
    """
    id_list = list(ids)
    rows = await conn.fetch(
        "SELECT id::text, status, input::text::int AS i, output::text AS output "
        "FROM flowkeeper.runs WHERE id = ANY($1::uuid[])",
        id_list,
    )
    lost = [dict(r) for r in rows if r["status"] not in FINISHED]
    missing = len(id_list) - len(rows)
    reexecuted = await conn.fetchval(
        "SELECT count(*) FROM fault_log WHERE recorded_before AND run_id = ANY($1::uuid[])",
        id_list,
    )
    executions = await conn.fetchval(
        "SELECT count(*) FROM fault_log WHERE run_id = ANY($1::uuid[])", id_list
    )
    checked = Checked(
        runs=len(id_list),
        executions=executions,
        repeated_before_recording=executions - len(id_list) * steps,
        reexecuted=reexecuted,
        lost=len(lost) + missing,
    )
    record(
        runs_driven=checked.runs,
        runs_lost=checked.lost,
        recorded_steps_reexecuted=checked.reexecuted,
        **counts,
    )

    assert missing == 0, f"{missing} runs vanished"
    assert not lost, f"{len(lost)} runs did not finish: {lost[:5]}"
    # crashy's steps fail only while something is down, and are retried: all complete.
    not_completed = [dict(r) for r in rows if r["status"] != "completed"]
    assert not not_completed, not_completed[:5]
    assert reexecuted == 0, f"{reexecuted} recorded steps ran again"
    per_run = await conn.fetch(
        "SELECT run_id, count(*) AS n FROM flowkeeper.steps "
        "WHERE kind = 'step' AND run_id = ANY($1::uuid[]) GROUP BY run_id",
        id_list,
    )
    assert len(per_run) == len(id_list)
    assert all(r["n"] == steps for r in per_run), "a run is missing recorded steps"
    never_ran = await conn.fetchval(
        "SELECT count(*) FROM flowkeeper.steps s WHERE s.kind = 'step' "
        "AND s.run_id = ANY($1::uuid[]) AND NOT EXISTS "
        "(SELECT 1 FROM fault_log f WHERE f.run_id = s.run_id AND f.key = s.key)",
        id_list,
    )
    assert never_ran == 0, f"{never_ran} steps recorded without their body having run"
    wrong = [dict(r) for r in rows if r["output"] != str(r["i"] + steps)]
    assert not wrong, f"runs returned the wrong output: {wrong[:5]}"
    return checked
