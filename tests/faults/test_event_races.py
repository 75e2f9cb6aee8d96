"""Waits being recorded while their events are sent, and the app server SIGKILLed meanwhile.

200 runs of ``tests/apps/event_race.py``: each takes a first step of random
length, then waits for event ``race`` with ``match={"i": i}``.  Each run's
event is sent from here at a random moment after its trigger (before its
wait is recorded, while it is being recorded, or after), all concurrently,
while the app server is SIGKILLed and restarted several times and the
scheduler ticks in the background.  Triggers and pushes that hit a dead
server fall back to the scheduler; invocations killed mid-way come back when
their lease expires.

Every run must end having seen its own event exactly once: completed, with
that event's data as its result, its one wait resolved by exactly that
event, each event resolving exactly one wait, and no run left waiting.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import asyncpg

from tests.apps.event_race import racer_workflow
from tests.helpers import KEY, make_fk

from .conftest import AppServer
from .summary import record
from .workload import FINISHED, ticking, wait_finished

RUNS = 200
WAVES = 20  # triggered in waves over about 4 s ...
KILLS = 4  # ... while the server is killed this many times
# Each event goes out 0-1 s after its run was triggered; half of them in the
# first 80 ms, about when the run's first step ends and its wait is recorded.
LATEST_SEND = 1.0
CLOSE_SEND = 0.08


async def test_waits_and_sends_racing_through_app_crashes_lose_no_event(
    database_url: str, conn: asyncpg.Connection, app_server: type[AppServer]
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    fk = make_fk(database_url, dispatch_lease=1.5, ack_timeout=2)
    fk.register(racer_workflow)
    server = app_server(
        "tests.apps.event_race_app",
        fk.test_port,  # type: ignore[attr-defined]
        {
            "DATABASE_URL": database_url,
            "FLOWKEEPER_SIGNING_KEY": KEY,
            "FLOWKEEPER_ENDPOINT": fk.dispatcher.endpoint,  # type: ignore[union-attr]
        },
    )
    server.start()
    ids: dict[int, str] = {}
    sends: list[asyncio.Task[None]] = []
    send_failures: list[str] = []

    async def send_later(i: int, delay: float) -> None:
        await asyncio.sleep(delay)
        # A send is one transaction in Postgres (which stays up): it never
        # depends on the app server; only its push does, and a push that
        # fails leaves the run due for the scheduler.
        try:
            await fk.send_event("race", {"i": i, "n": f"event-{i}"})
        except Exception as exc:  # reported below: a send must not fail either
            send_failures.append(f"{i}: {type(exc).__name__}: {exc}")

    async def killer() -> None:
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.4, 1.0))
            await asyncio.to_thread(server.kill)
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            await asyncio.to_thread(server.start)

    try:
        async with ticking(fk):
            killing = asyncio.create_task(killer())
            per_wave = RUNS // WAVES
            for wave in range(WAVES):
                numbers = range(wave * per_wave, (wave + 1) * per_wave)
                handles = await asyncio.gather(*(fk.trigger("racer", i) for i in numbers))
                for i, handle in zip(numbers, handles, strict=True):
                    ids[i] = handle.run_id
                    latest = CLOSE_SEND if rng.random() < 0.5 else LATEST_SEND
                    sends.append(asyncio.create_task(send_later(i, rng.uniform(0, latest))))
                await asyncio.sleep(rng.uniform(0.05, 0.3))
            await killing
            await asyncio.gather(*sends)
            await wait_finished(database_url, list(ids.values()), timeout=120)
    finally:
        server.stop()
        await fk.aclose()

    started = time.monotonic()
    lost, never_ended, problems = await check_each_run_saw_its_event_once(conn, ids)
    record(
        runs_driven=len(ids),
        kills_injected=server.kills,
        runs_lost=lost,
        runs_never_ended=never_ended,
    )
    assert not send_failures, f"seed {seed}: sends failed: {send_failures[:5]}"
    assert not problems, f"seed {seed}: " + "; ".join(problems)
    assert lost == 0 and never_ended == 0
    assert server.kills == KILLS
    by_lookback, by_send, overlapping = await resolution_counts(conn)
    # Both orders happened (else the race was not run): events sent before
    # the wait was recorded, found by its lookback, and waits woken by the send.
    assert by_lookback and by_send, (by_lookback, by_send)
    print(
        f"\nevent races: {len(ids)} runs, {server.kills} SIGKILLs; {by_lookback} waits found "
        f"their event already sent, {by_send} were woken by it ({overlapping} of them by a "
        "send already under way when the wait was recorded); every run saw its own event "
        f"once (checked in {time.monotonic() - started:.2f}s, seed {seed})"
    )


async def check_each_run_saw_its_event_once(
    conn: asyncpg.Connection, ids: dict[int, str]
) -> tuple[int, int, list[str]]:
    """(runs lost, runs that never ended, what is wrong) over the runs ``ids`` (i -> run)."""
    rows = await conn.fetch(
        "SELECT id::text, status, (input::text)::int AS i, output::text AS output "
        "FROM flowkeeper.runs WHERE id = ANY($1::uuid[])",
        list(ids.values()),
    )
    problems: list[str] = []
    missing = len(ids) - len(rows)
    if missing:
        problems.append(f"{missing} runs vanished")
    unfinished = [r for r in rows if r["status"] not in FINISHED]
    if unfinished:
        states = await conn.fetch(
            "SELECT r.id::text, r.status, r.due_at, r.lease_token IS NOT NULL AS leased, "
            "       w.resolved_at, w.outcome, s.status AS wait_step "
            "FROM flowkeeper.runs r LEFT JOIN flowkeeper.waits w ON w.run_id = r.id "
            "LEFT JOIN flowkeeper.steps s ON s.run_id = r.id AND s.kind = 'wait' "
            "WHERE r.id = ANY($1::uuid[])",
            [r["id"] for r in unfinished],
        )
        problems.append(f"{len(unfinished)} runs never ended: {[dict(s) for s in states[:5]]}")
    wrong = [
        dict(r)
        for r in rows
        if r["status"] in FINISHED
        and (
            r["status"] != "completed"
            or json.loads(r["output"]) != {"i": r["i"], "n": f"event-{r['i']}"}
        )
    ]
    if wrong:
        problems.append(f"{len(wrong)} runs did not return their own event: {wrong[:5]}")
    waits = await conn.fetch(
        "SELECT w.run_id::text, (r.input::text)::int AS i, w.outcome, "
        "       (e.data->>'i')::int AS event_i "
        "FROM flowkeeper.waits w JOIN flowkeeper.runs r ON r.id = w.run_id "
        "LEFT JOIN flowkeeper.event_log e ON e.id = w.resolved_event "
        "WHERE w.run_id = ANY($1::uuid[])",
        list(ids.values()),
    )
    per_run: dict[str, int] = {}
    for w in waits:
        per_run[w["run_id"]] = per_run.get(w["run_id"], 0) + 1
    not_once = [rid for rid in ids.values() if per_run.get(rid, 0) != 1]
    if not_once:
        problems.append(f"{len(not_once)} runs have not exactly one wait: {not_once[:5]}")
    misresolved = [dict(w) for w in waits if w["outcome"] != "event" or w["event_i"] != w["i"]]
    if misresolved:
        problems.append(f"{len(misresolved)} waits not resolved by their event: {misresolved[:5]}")
    per_event = await conn.fetch(
        "SELECT (e.data->>'i')::int AS i, count(w.run_id) AS waits "
        "FROM flowkeeper.event_log e LEFT JOIN flowkeeper.waits w ON w.resolved_event = e.id "
        "WHERE e.name = 'race' GROUP BY e.id, e.data"
    )
    if sorted(r["i"] for r in per_event) != sorted(ids):
        problems.append(f"{len(per_event)} race events stored for {len(ids)} sends")
    bad_events = [dict(r) for r in per_event if r["waits"] != 1]
    if bad_events:
        problems.append(f"{len(bad_events)} events did not resolve one wait: {bad_events[:5]}")
    wait_steps = await conn.fetch(
        "SELECT run_id::text, count(*) AS n, bool_and(status = 'completed') AS done "
        "FROM flowkeeper.steps WHERE kind = 'wait' AND run_id = ANY($1::uuid[]) "
        "GROUP BY run_id",
        list(ids.values()),
    )
    if len(wait_steps) != len(ids) or not all(s["n"] == 1 and s["done"] for s in wait_steps):
        problems.append("a run's history does not hold exactly one completed wait")
    lost = missing + len(wrong)
    return lost, len(unfinished), problems


async def resolution_counts(conn: asyncpg.Connection) -> tuple[int, int, int]:
    """Waits that found their event when recorded (lookback), waits woken by the send, and
    of those, how many by a send whose transaction began before the wait's.

    Both times are the transactions' start (``now()``): a wait resolved at
    registration has ``resolved_at = created_at``; one woken by a send that
    was under way before it and committed after it has ``resolved_at < created_at``.
    """
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE resolved_at = created_at) AS lookback, "
        "       count(*) FILTER (WHERE resolved_at <> created_at) AS woken, "
        "       count(*) FILTER (WHERE resolved_at < created_at) AS overlapping "
        "FROM flowkeeper.waits WHERE event_name = 'race'"
    )
    assert row is not None
    return int(row["lookback"]), int(row["woken"]), int(row["overlapping"])
