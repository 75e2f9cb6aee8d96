"""Poison values, deadly steps and operator actions, under SIGKILLs, all at once.

A mixed workload (``tests/apps/poison.py``: NaN results, NUL-bearing errors,
sync steps that overrun their timeout, steps that ``os._exit`` their process,
dicts iterated across durable sleeps, plain multi-step runs) runs through a
real uvicorn subprocess with the scheduler ticking.  Meanwhile the test
SIGKILLs the app server at random moments (and restarts it whenever it died,
whoever killed it), cancels random live runs and replays them a little later,
and replays failed runs.

Every run must end, as its workflow dictates; no recorded step may run again;
no two executions of one step of one run may overlap in time (a body killed
mid-way ends when its process died, as recorded in ``poison_deaths``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from flowkeeper import FlowKeeper, RunStateError
from flowkeeper.serialization import clean_text
from tests.apps import poison
from tests.helpers import KEY, make_fk

from .conftest import AppServer
from .summary import record
from .workload import FINISHED, ticking

pytestmark = pytest.mark.slow

LEASE = 1.5
WAVES = 10
WAVE = ("normal", "sync", "cart", "nan", "nul", "sync", "exit", "cart", "fan")
MAX_KILLS = 8
MAX_CANCELS = 20
MAX_FAILED_REPLAYS = 8
LEAVE_CANCELLED_EVERY = 4  # every 4th cancelled run is left cancelled, the rest replayed
FINISH_TIMEOUT = 60.0

OVERLAPS_SQL = """
WITH spans AS (
    SELECT l.id, l.run_id, l.key, l.pid, l.started_at,
           coalesce(l.ended_at,
                    (SELECT min(d.at) FROM poison_deaths d
                     WHERE d.pid = l.pid AND d.at >= l.started_at),
                    'infinity') AS ended_at
    FROM poison_log l WHERE l.run_id = ANY($1::uuid[])
)
SELECT a.run_id::text, a.key, a.id AS first, b.id AS second,
       a.pid AS first_pid, a.started_at AS first_started, a.ended_at AS first_ended,
       b.pid AS second_pid, b.started_at AS second_started, b.ended_at AS second_ended,
       (SELECT array_agg(d.how || ' at ' || d.at::text ORDER BY d.id) FROM poison_deaths d
        WHERE d.pid = a.pid) AS first_pid_deaths
FROM spans a JOIN spans b
  ON a.run_id = b.run_id AND a.key = b.key AND a.id < b.id
 AND a.started_at < b.ended_at AND b.started_at < a.ended_at
"""

# Bodies that started after their run was cancelled (and before its replay, if
# any): the heartbeat (every lease/3) stops a cancelled run's invocation, so
# none may start later than this after the cancellation.
AFTER_CANCEL_SQL = """
WITH c AS (
    SELECT e.run_id, e.at AS cancelled_at,
           coalesce((SELECT min(r.at) FROM flowkeeper.events r
                     WHERE r.run_id = e.run_id AND r.kind = 'replayed' AND r.id > e.id),
                    'infinity') AS replayed_at
    FROM flowkeeper.events e WHERE e.kind = 'cancelled' AND e.run_id = ANY($1::uuid[])
)
SELECT l.run_id::text, l.key, l.started_at, c.cancelled_at
FROM poison_log l JOIN c ON c.run_id = l.run_id
WHERE l.started_at > c.cancelled_at + $2::interval AND l.started_at < c.replayed_at
"""


@dataclass
class Run:
    kind: str
    run_id: str
    input: Any
    operated: list[str] = field(default_factory=list)  # operator actions, in order
    left_cancelled: bool = False


class Chaos:
    """The app server under fire: SIGKILLs, restarts after any death, deaths recorded."""

    def __init__(self, server: AppServer, pool: asyncpg.Pool, rng: random.Random) -> None:
        self.server = server
        self.pool = pool
        self.rng = rng
        self.lock = asyncio.Lock()
        self.restarts = 0
        self.self_exits = 0

    async def record_death(self, pid: int, how: str) -> None:
        await self.pool.execute("INSERT INTO poison_deaths (pid, how) VALUES ($1, $2)", pid, how)

    async def start(self) -> None:
        for _ in range(10):
            try:
                await asyncio.to_thread(self.server.start)
                return
            except RuntimeError:  # it died while starting (a deadly step, at once)
                assert self.server.proc is not None
                await self.record_death(self.server.proc.pid, "exited while starting")
        raise RuntimeError("the app server would not stay up")

    async def kill(self) -> None:
        async with self.lock:
            proc = self.server.proc
            assert proc is not None
            if proc.poll() is None:
                await asyncio.to_thread(self.server.kill)
                await self.record_death(proc.pid, "sigkill")
            else:  # a step's os._exit, before the watcher saw it: record it all the same
                # (the step's own record precedes its exit, and a body may start between)
                self.self_exits += 1
                await self.record_death(proc.pid, f"exited with {proc.returncode}")
            await asyncio.sleep(self.rng.uniform(0.0, 0.3))
            await self.start()
            self.restarts += 1

    async def watch(self) -> None:
        """Restart the server whenever it died (a step's os._exit); poll proc.poll()."""
        while True:
            await asyncio.sleep(0.05)
            proc = self.server.proc
            if proc is None or proc.poll() is None or self.lock.locked():
                continue
            async with self.lock:
                if self.server.proc is not proc:
                    continue
                self.self_exits += 1
                await self.record_death(proc.pid, f"exited with {proc.returncode}")
                await self.start()
                self.restarts += 1

    async def stop(self) -> None:
        async with self.lock:
            proc = self.server.proc
            await asyncio.to_thread(self.server.stop)
            if proc is not None:
                await self.record_death(proc.pid, "stopped at the end")


class Operator:
    """Cancels random live runs (then replays most of them) and replays failed runs."""

    def __init__(
        self, fk: FlowKeeper, pool: asyncpg.Pool, runs: dict[str, Run], rng: random.Random
    ) -> None:
        self.fk = fk
        self.pool = pool
        self.runs = runs
        self.rng = rng
        self.cancels = 0
        self.replays = 0
        self.failed_replays = 0
        self.not_stopped_yet = 0  # replays refused while a cancelled step was still running
        self.pending: set[asyncio.Task[None]] = set()
        self.replayed_failed: set[str] = set()

    async def act(self) -> None:
        if self.cancels < MAX_CANCELS and self.rng.random() < 0.6:
            await self.cancel_one()
        elif self.failed_replays < MAX_FAILED_REPLAYS:
            await self.replay_failed_one()

    async def cancel_one(self) -> None:
        # Most of the time, one with a step executing right now.
        live = await self.pool.fetch(
            "SELECT id::text AS id FROM flowkeeper.runs WHERE id = ANY($1::uuid[]) "
            "AND status IN ('queued', 'running', 'sleeping', 'retrying') AND (executing OR $2)",
            [r for r, run in self.runs.items() if "cancel" not in run.operated],
            self.rng.random() < 0.3,
        )
        if not live:
            return
        rid = self.rng.choice(live)["id"]
        run = self.runs[rid]
        if not await self.fk.cancel(rid, reason="poison workload"):
            return  # it finished first
        self.cancels += 1
        run.operated.append("cancel")
        if self.cancels % LEAVE_CANCELLED_EVERY == 0:
            run.left_cancelled = True
            return
        task = asyncio.create_task(self.replay_later(run, self.rng.uniform(0.0, 0.6)))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def replay_later(self, run: Run, delay: float) -> None:
        await asyncio.sleep(delay)
        give_up = time.monotonic() + 30
        while True:
            try:
                await self.fk.replay(run.run_id, reason="poison workload: after cancel")
                break
            except RunStateError as exc:
                if time.monotonic() > give_up:
                    raise
                if "has not stopped yet" in str(exc):
                    self.not_stopped_yet += 1
                elif "changed while it was being replayed" not in str(exc):
                    raise
                await asyncio.sleep(0.05)
        self.replays += 1
        run.operated.append("replay")

    async def replay_failed_one(self) -> None:
        failed = await self.pool.fetch(
            "SELECT id::text AS id FROM flowkeeper.runs WHERE id = ANY($1::uuid[]) "
            "AND status = 'failed'",
            [r for r in self.runs if r not in self.replayed_failed],
        )
        if not failed:
            return
        rid = self.rng.choice(failed)["id"]
        self.replayed_failed.add(rid)
        await self.fk.replay(rid, reason="poison workload: failed run")
        self.failed_replays += 1
        self.runs[rid].operated.append("replay-failed")

    async def drain(self) -> None:
        while self.pending:
            await asyncio.gather(*self.pending)


async def trigger(fk: FlowKeeper, kind: str, n: int) -> Run:
    value: Any = n
    if kind == "exit":
        value = {"n": n, "deadly": int(n // len(WAVE) % 2 == 0)}  # on every other wave
    handle = await fk.trigger(f"poison-{kind}", value)
    return Run(kind, handle.run_id, value)


async def wait_ended(pool: asyncpg.Pool, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = await pool.fetchval(
            "SELECT count(*) FROM flowkeeper.runs WHERE id = ANY($1::uuid[]) "
            "AND status = ANY($2::text[])",
            ids,
            list(FINISHED),
        )
        if done == len(ids):
            return
        await asyncio.sleep(0.2)


async def test_poison_workload_under_kills_and_operator_actions(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    await conn.execute(poison.SCHEMA_SQL)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    fk = make_fk(database_url, lease=LEASE, dispatch_lease=LEASE, ack_timeout=2)
    for workflow in poison.WORKFLOWS:
        fk.register(workflow)
    server = app_server(
        "tests.apps.poison_app",
        fk.test_port,  # type: ignore[attr-defined]
        {
            "DATABASE_URL": database_url,
            "FLOWKEEPER_SIGNING_KEY": KEY,
            "FLOWKEEPER_ENDPOINT": fk.dispatcher.endpoint,  # type: ignore[union-attr]
            "FAULT_LEASE": str(LEASE),
        },
    )
    rng = random.Random(20261127)
    chaos = Chaos(server, pool, rng)
    operator = Operator(fk, pool, {}, rng)
    runs = operator.runs
    started = time.monotonic()
    phases: dict[str, float] = {}
    await chaos.start()
    watcher = asyncio.create_task(chaos.watch())
    background = [watcher]
    try:
        async with ticking(fk):
            stop_operating = time.monotonic() + 1e9

            async def operate() -> None:
                while time.monotonic() < stop_operating:
                    await asyncio.sleep(rng.uniform(0.15, 0.45))
                    await operator.act()

            async def kill_now_and_then() -> None:
                while chaos.server.kills < MAX_KILLS:
                    await asyncio.sleep(rng.uniform(0.6, 2.0))
                    await chaos.kill()

            operating = asyncio.create_task(operate())
            killing = asyncio.create_task(kill_now_and_then())
            background += [operating, killing]
            for wave in range(WAVES):
                for run in await asyncio.gather(
                    *(trigger(fk, kind, wave * len(WAVE) + i) for i, kind in enumerate(WAVE))
                ):
                    runs[run.run_id] = run
                await asyncio.sleep(rng.uniform(0.3, 0.9))
            phases["all triggered"] = time.monotonic() - started
            await killing
            phases["kills done"] = time.monotonic() - started
            stop_operating = time.monotonic() + 3  # a few more actions on the tail
            await operating
            await operator.drain()
            phases["operator done"] = time.monotonic() - started
            await wait_ended(pool, list(runs), FINISH_TIMEOUT)
            phases["all ended"] = time.monotonic() - started
    finally:
        for task in background + list(operator.pending):
            task.cancel()
        for task in background + list(operator.pending):
            with contextlib.suppress(BaseException):
                await task
        await chaos.stop()
        await fk.aclose()
    elapsed = time.monotonic() - started

    ids = list(runs)
    children = await conn.fetch(
        "SELECT parent_id, parent_step FROM flowkeeper.runs WHERE parent_id = ANY($1::uuid[])",
        ids,
    )
    twice = len(children) - len({(c["parent_id"], c["parent_step"]) for c in children})
    child_reexecuted = await conn.fetchval(
        "SELECT count(*) FROM poison_log l JOIN flowkeeper.runs r ON r.id = l.run_id "
        "WHERE l.recorded_before AND r.parent_id = ANY($1::uuid[])",
        ids,
    )
    try:
        report = await check(conn, runs)
    finally:
        await pool.close()
    record(
        runs_driven=len(ids),
        kills_injected=server.kills,
        lost_attempt_runs=report["exit_deaths"],
        lost_attempts_counted=report["attempts_lost"],
        poison_runs=sum(1 for r in runs.values() if r.kind != "normal" or r.operated),
        runs_lost=report["missing"] + len(report["never_ended"]),
        runs_never_ended=len(report["never_ended"]),
        overlapping_attempts=len(report["overlaps"]),
        recorded_steps_reexecuted=report["reexecuted"] + child_reexecuted,
        children_started=len(children),
        children_started_twice=twice,
    )
    print(
        f"\npoison workload: {len(ids)} runs ({dict(Counter(r.kind for r in runs.values()))}) "
        f"in {elapsed:.1f}s (" + ", ".join(f"{k} at {v:.1f}s" for k, v in phases.items()) + "); "
        f"{server.kills} SIGKILLs, {chaos.self_exits} self-exits, "
        f"{chaos.restarts} restarts; {operator.cancels} cancels "
        f"({sum(r.left_cancelled for r in runs.values())} left cancelled), {operator.replays} "
        f"replays after cancel ({operator.not_stopped_yet} refused while the step was still "
        f"stopping), {operator.failed_replays} replays of failed runs; "
        f"{report['executions']} step executions ({report['killed_mid_way']} killed mid-way), "
        f"{report['attempts_lost']} attempts lost, "
        f"{report['gave_up_lost']} runs failed on lost attempts, the others as their workflow "
        f"dictates ({dict(report['as_dictated'])}); {len(report['overlaps'])} overlaps, "
        f"{report['reexecuted']} re-executed"
    )
    assert report["missing"] == 0, f"{report['missing']} runs vanished"
    assert not report["never_ended"], "runs that never ended:\n" + "\n".join(
        json.dumps(s, default=str) for s in report["never_ended"]
    )
    assert not report["overlaps"], f"step attempts overlapped: {report['overlaps'][:5]}"
    assert not report["after_cancel"], f"steps started after a cancel: {report['after_cancel']}"
    assert report["reexecuted"] == 0, f"{report['reexecuted']} recorded steps ran again"
    assert twice == 0 and children, f"{twice} children started twice"
    assert child_reexecuted == 0, f"{child_reexecuted} recorded steps of children ran again"
    assert not report["wrong"], "runs ended wrongly:\n" + "\n".join(
        json.dumps(w, default=str) for w in report["wrong"][:10]
    )
    # Each poison ended its own way at least once (not every run of a kind was
    # cancelled and left, or failed on attempts lost to the kills).
    assert set(report["as_dictated"]) == set(poison.KINDS), report["as_dictated"]
    assert server.kills == MAX_KILLS
    assert report["killed_mid_way"] > 0  # else the overlap check proved little
    assert report["exit_deaths"] > 0 and chaos.self_exits > 0
    assert operator.cancels > 0 and operator.replays > 0 and operator.failed_replays > 0


async def check(conn: asyncpg.Connection, runs: dict[str, Run]) -> dict[str, Any]:
    """The final state against what each run's workflow dictates; figures for the summary."""
    ids = list(runs)
    rows = {
        r["id"]: r
        for r in await conn.fetch(
            "SELECT id::text AS id, status, output::text AS output, error::text AS error, "
            "invocations FROM flowkeeper.runs WHERE id = ANY($1::uuid[])",
            ids,
        )
    }
    never_ended: list[dict[str, Any]] = []
    for rid, row in rows.items():
        if row["status"] not in FINISHED:
            events = await conn.fetch(
                "SELECT kind, step_key, attempt, detail::text FROM flowkeeper.events "
                "WHERE run_id = $1 ORDER BY id DESC LIMIT 8",
                rid,
            )
            state = await conn.fetchrow(
                "SELECT status, step_key, step_attempt, due_at, lease_token IS NOT NULL AS leased,"
                " executing, lost_attempts FROM flowkeeper.runs WHERE id = $1",
                rid,
            )
            never_ended.append(
                {
                    "run": rid,
                    "kind": runs[rid].kind,
                    "operated": runs[rid].operated,
                    "state": dict(state) if state else None,
                    "last_events": [dict(e) for e in events],
                }
            )
    overlaps = [dict(r) for r in await conn.fetch(OVERLAPS_SQL, ids)]
    after_cancel = [
        dict(r) for r in await conn.fetch(AFTER_CANCEL_SQL, ids, timedelta(seconds=2 * LEASE))
    ]
    killed_mid_way = await conn.fetchval(
        "SELECT count(*) FROM poison_log WHERE ended_at IS NULL AND run_id = ANY($1::uuid[])", ids
    )
    reexecuted = await conn.fetchval(
        "SELECT count(*) FROM poison_log WHERE recorded_before AND run_id = ANY($1::uuid[])", ids
    )
    executions = await conn.fetchval(
        "SELECT count(*) FROM poison_log WHERE run_id = ANY($1::uuid[])", ids
    )
    lost_rows = await conn.fetch(
        "SELECT run_id::text AS run_id, step_key, count(*) AS n FROM flowkeeper.events "
        "WHERE kind = 'attempt_lost' AND run_id = ANY($1::uuid[]) GROUP BY 1, 2",
        ids,
    )
    lost_by_step = {(r["run_id"], r["step_key"]): r["n"] for r in lost_rows}
    exit_deaths = await conn.fetchval("SELECT count(*) FROM poison_deaths WHERE how = 'os._exit'")
    steps: dict[str, dict[str, asyncpg.Record]] = {}
    for s in await conn.fetch(
        "SELECT run_id::text AS run_id, key, name, position, status, attempts, "
        "output::text AS output FROM flowkeeper.steps WHERE run_id = ANY($1::uuid[])",
        ids,
    ):
        steps.setdefault(s["run_id"], {})[s["key"]] = s
    logs: dict[str, list[asyncpg.Record]] = {}
    for entry in await conn.fetch(
        "SELECT run_id::text AS run_id, key, item, outcome FROM poison_log "
        "WHERE run_id = ANY($1::uuid[]) ORDER BY id",
        ids,
    ):
        logs.setdefault(entry["run_id"], []).append(entry)

    wrong: list[dict[str, Any]] = []
    gave_up_lost = 0
    as_dictated: Counter[str] = Counter()  # runs that ended the way their workflow says
    for rid, run in runs.items():
        found = rows.get(rid)
        if found is None or found["status"] not in FINISHED:
            continue
        problem = expect(run, found, steps.get(rid, {}), logs.get(rid, []), lost_by_step)
        if problem is None and not run.left_cancelled:
            as_dictated[run.kind] += 1
        if problem == "lost":
            gave_up_lost += 1
        elif problem:
            wrong.append({"run": rid, "kind": run.kind, "operated": run.operated,
                          "status": found["status"], "output": found["output"],
                          "error": found["error"], "problem": problem})  # fmt: skip
    return {
        "missing": len(ids) - len(rows),
        "never_ended": never_ended,
        "overlaps": overlaps,
        "after_cancel": after_cancel,
        "killed_mid_way": killed_mid_way,
        "reexecuted": reexecuted,
        "executions": executions,
        "attempts_lost": sum(lost_by_step.values()),
        "exit_deaths": exit_deaths,
        "gave_up_lost": gave_up_lost,
        "wrong": wrong,
        "as_dictated": as_dictated,
    }


def expect(
    run: Run,
    row: asyncpg.Record,
    steps: dict[str, asyncpg.Record],
    log: list[asyncpg.Record],
    lost_by_step: dict[tuple[str, str | None], int],
) -> str | None:
    """What is wrong with a finished run ("lost": it gave up on lost attempts, rightly)."""
    status = row["status"]
    if run.left_cancelled:
        return None if status == "cancelled" else f"left cancelled, but {status}"
    error = json.loads(row["error"]) if row["error"] else {}
    if status == "failed" and str(error.get("type", "")).endswith("AttemptLostError"):
        # Its process died during the step as many times as its policy allows.
        if lost_by_step.get((run.run_id, error.get("step")), 0) == 0:
            return "AttemptLostError without any attempt_lost event"
        return "lost"
    output = json.loads(row["output"]) if row["output"] else None
    n = run.input["n"] if isinstance(run.input, dict) else run.input
    if run.kind == "normal":
        return None if (status, output) == ("completed", n + 6) else "expected completed, n + 6"
    if run.kind == "fan":
        return None if (status, output) == ("completed", n + 36) else "expected completed, n + 36"
    if run.kind == "exit":
        return None if (status, output) == ("completed", n) else "expected completed, n"
    if run.kind == "cart":
        return check_cart(run, status, output, steps, log)
    if status != "failed":
        return f"expected failed, got {status}"
    step = steps.get(error.get("step", ""))
    if run.kind == "nan":
        if error.get("step") != "nan" or error.get("type") != "SerializationError":
            return "expected a SerializationError in step 'nan'"
        # One attempt, plus those lost with their process before it.
        lost = lost_by_step.get((run.run_id, "nan"), 0)
        if step is None or step["status"] != "failed" or not 1 <= step["attempts"] <= 1 + lost:
            return "the NaN step must fail once, not be retried"
        executions = sum(1 for e in log if e["key"] == "nan")
        if executions > row["invocations"]:
            return f"the NaN step ran {executions} times in {row['invocations']} invocations"
        return None
    if run.kind == "nul":
        if error.get("step") != "nul" or error.get("type") != "ValueError":
            return "expected a ValueError in step 'nul'"
        if error.get("message") != clean_text(poison.NUL_MESSAGE):
            return "the NUL/surrogate message was not stored cleaned"
        if step is None or step["attempts"] != poison.NUL_RETRY.max_attempts:
            return "the NUL step was not retried per its policy"
        return None
    if run.kind == "sync":
        if error.get("step") != "overrun" or not str(error.get("type")).endswith(
            "StepTimeoutError"
        ):
            return "expected a StepTimeoutError in step 'overrun'"
        if step is None or step["attempts"] != poison.SYNC_RETRY.max_attempts:
            return "the overrunning sync step did not use its attempts"
        return None
    return f"unknown kind {run.kind}"


def check_cart(
    run: Run,
    status: str,
    output: Any,
    steps: dict[str, asyncpg.Record],
    log: list[asyncpg.Record],
) -> str | None:
    """Each item charged exactly once (one recorded charge), in the dict's insertion order."""
    order = poison.cart_order(run.input)
    if (status, output) != ("completed", order):
        return f"expected completed with {order}"
    loaded = steps.get("load-cart")
    if loaded is None or list(json.loads(loaded["output"])) != order:
        return "the recorded cart lost its key order"
    charges = sorted(
        (s for s in steps.values() if s["name"] == "charge"), key=lambda s: s["position"]
    )
    if [json.loads(s["output"]) for s in charges] != order:
        return "the recorded charges are not one per item in insertion order"
    for i, item in enumerate(order):
        keys = {e["key"] for e in log if e["item"] == item}
        if keys != {poison.step_key("charge", i)}:
            return f"item {item} was charged by steps {sorted(keys)}"
    return None
