"""Event figures: send_event among many waiting runs, and a burst of events through the endpoint.

    .venv/bin/python -m bench.events            # both parts (about 2 minutes)
    .venv/bin/python -m bench.events --quick    # a smoke test (well under a minute)

probe   ``send_event`` waking one run among N waiting runs, N = 1,000 and
        N = 100,000, each in its own database: the time per event (one
        transaction, nothing pushed) in interleaved rounds, and the ratio of
        the two (target <= 1.3: matching a wait is an index probe, not a scan),
        with the plan Postgres uses for the probe inside send_event
        (auto_explain of the function's nested statement, generic plan and all).
        The waiting runs are one run suspended through the real path (trigger,
        then ``fk.advance`` registering its wait) cloned N-1 times in SQL:
        every column of its ``runs``, ``steps`` and ``waits`` rows copied,
        only the run id, the input and the match values changed.
burst   1,000 runs each waiting for its own event (triggered through the
        endpoint and suspended there, not timed), then 1,000 events sent at once
        (64 in flight), each pushing its woken run to the endpoint (uvicorn, a
        subprocess) which finishes it; events/s against the plain three-step
        workflows/s of bench/core.py measured in the same interleaved rounds
        (target: >= 50 %).

A private PostgreSQL with default durability (fsync and synchronous_commit
on), or BENCH_DATABASE_URL (databases are created there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from flowkeeper import FlowKeeper

from .apps.workflows import WORKFLOWS
from .common import (
    KEY,
    DatabaseStats,
    durable_cluster,
    interpreter,
    median,
    quiesce,
    served_app,
    table,
)
from .compare import machine, server_facts
from .core import run_batch

EVENT = "bench.go"
PROBE_TARGET = 1.3
BURST_TARGET = 0.5


# filling a database with waiting runs --------------------------------------------
async def create_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()


def in_process(url: str) -> FlowKeeper:
    """A FlowKeeper without an endpoint: nothing is pushed, runs advance in this process."""
    fk = FlowKeeper(url, KEY, None, pool_size=4)
    fk.register(WORKFLOWS["waiter"])
    return fk


async def _columns(conn: asyncpg.Connection, table_name: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'flowkeeper' AND table_name = $1 AND is_generated = 'NEVER' "
        "ORDER BY ordinal_position",
        table_name,
    )
    return [r["column_name"] for r in rows]


async def fill_waiting(url: str, count: int) -> str:
    """``count`` runs waiting for their own event (inputs 0..count-1); the template's id.

    Run 0 goes through the real path: triggered, then advanced here until its
    wait is registered (register_wait) and it is suspended.  Its rows are then
    cloned ``count - 1`` times, every column copied as register_wait left it
    except the run id, the input and the wait's match (``{"n": i}``).
    """
    fk = in_process(url)
    try:
        await fk.migrate()
        handle = await fk.trigger("waiter", 0)
        await fk.advance(handle.run_id)
    finally:
        await fk.aclose()
    conn = await asyncpg.connect(url)
    try:
        state = await conn.fetchrow(
            "SELECT r.status, w.match::text AS match, w.match_values::text AS vals, "
            "       s.input::text AS step_input "
            "FROM flowkeeper.runs r JOIN flowkeeper.waits w ON w.run_id = r.id "
            "JOIN flowkeeper.steps s ON s.run_id = r.id AND s.key = w.key WHERE r.id = $1",
            handle.run_id,
        )
        assert state is not None
        assert state["status"] == "waiting", dict(state)
        assert state["match"] == '{"n": 0}', dict(state)
        assert state["vals"] == "[0]", dict(state)
        assert '{"n": 0}' in state["step_input"], state["step_input"]
        overrides = {
            "runs": {"id": "c.id", "input": "to_json(c.n)"},
            "steps": {
                "run_id": "c.id",
                "input": "replace(t.input::text, '{\"n\": 0}', '{\"n\": ' || c.n || '}')::json",
            },
            "waits": {
                "run_id": "c.id",
                "match": "('{\"n\": ' || c.n || '}')::json",
                "match_values": "jsonb_build_array(c.n)",
            },
        }
        async with conn.transaction():
            await conn.execute(
                "CREATE TEMP TABLE clones ON COMMIT DROP AS "
                "SELECT n, gen_random_uuid() AS id FROM generate_series(1, $1::int - 1) n",
                count,
            )
            for table_name, changed in overrides.items():
                columns = await _columns(conn, table_name)
                key = "id" if table_name == "runs" else "run_id"
                values = [changed.get(c, f"t.{c}") for c in columns]
                await conn.execute(
                    f"INSERT INTO flowkeeper.{table_name} ({', '.join(columns)}) "
                    f"SELECT {', '.join(values)} FROM flowkeeper.{table_name} t, clones c "
                    f"WHERE t.{key} = $1 ORDER BY c.n",
                    handle.run_id,
                )
        await conn.execute("VACUUM ANALYZE flowkeeper.runs, flowkeeper.steps, flowkeeper.waits")
        waiting = await conn.fetchval(
            "SELECT count(*) FROM flowkeeper.waits WHERE resolved_at IS NULL AND event_name = $1",
            EVENT,
        )
        assert waiting == count, (waiting, count)
    finally:
        await conn.close()
    return handle.run_id


# probe ------------------------------------------------------------------------------
async def send_times(fk: FlowKeeper, numbers: Sequence[int]) -> list[float]:
    """Seconds per send_event, one after another, each waking exactly its own run."""
    times = []
    for n in numbers:
        started = time.perf_counter()
        sent = await fk.send_event(EVENT, {"n": n})
        times.append(time.perf_counter() - started)
        assert len(sent.woken) == 1, (n, sent)
    return times


PROBE_SQL = (
    "SELECT kind, event_id, run_id, lease FROM flowkeeper.send_event($1, NULL, $2::json, "
    "NULL, NULL)"
)


async def probe_plan(url: str, n: int) -> list[str]:
    """The plan of send_event's nested wait probe, as Postgres runs it inside the function.

    auto_explain logs every nested statement's plan; client_min_messages
    brings those log lines to this session.  The send is rolled back.  It is
    the seventh call in the session, so plpgsql's cached (generic) plan is the
    one shown, as in a long-lived pooled connection.
    """
    conn = await asyncpg.connect(url)
    plans: list[str] = []
    conn.add_log_listener(lambda _c, message: plans.append(message.message))
    try:
        await conn.execute(
            "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; "
            "SET auto_explain.log_nested_statements = on; SET auto_explain.log_analyze = on; "
            "SET auto_explain.log_timing = off; SET auto_explain.log_buffers = on; "
            "SET client_min_messages = log"
        )
        for attempt in range(7):
            plans.clear()
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.fetch(PROBE_SQL, EVENT, json.dumps({"n": n - 1 - attempt}))
            finally:
                await tx.rollback()
            await asyncio.sleep(0.05)  # the log messages arrive asynchronously
    finally:
        await conn.close()
    probe = [p for p in plans if "Update on waits" in p]
    if not probe:
        return ["(auto_explain showed no plan for the probe)"]
    lines = probe[-1].splitlines()
    return [line for line in lines if line.strip()]


async def send_event_exec(admin: asyncpg.Connection, database: str) -> tuple[float, int, int]:
    """Server-side time (ms), calls and WAL full-page images of send_event so far
    (pg_stat_statements), or zeros."""
    try:
        row = await admin.fetchrow(
            "SELECT coalesce(sum(total_exec_time), 0) AS ms, coalesce(sum(calls), 0) AS calls, "
            "       coalesce(sum(wal_fpi), 0) AS fpi "
            "FROM pg_stat_statements WHERE query LIKE '%flowkeeper.send_event(%' "
            "AND dbid = (SELECT oid FROM pg_database WHERE datname = $1)",
            database,
        )
    except asyncpg.PostgresError:  # not preloaded here
        return 0.0, 0, 0
    assert row is not None
    return float(row["ms"]), int(row["calls"]), int(row["fpi"])


async def probe(args: argparse.Namespace, admin_url: str, dsn: Any) -> dict[str, Any]:
    sizes = args.waiting
    urls = {}
    for size in sizes:
        name = f"bench_events_{size}"
        await create_database(admin_url, name)
        urls[size] = dsn(name)
        print(f"probe: filling {size:,} waiting runs", file=sys.stderr)
        await fill_waiting(urls[size], size)
    warmup = min(args.sends, 50)
    needed = warmup + args.sends * args.rounds
    if needed > min(sizes) - 1:
        raise SystemExit(
            f"{needed} sends would wake more runs than the {min(sizes):,} waiting: "
            "lower --sends or --rounds"
        )
    rng = random.Random(11)  # each send wakes a run not woken before, in random order
    left = {size: rng.sample(range(1, size), needed) for size in sizes}
    fks = {size: in_process(urls[size]) for size in sizes}
    rounds: dict[int, list[float]] = {size: [] for size in sizes}
    server: dict[int, list[float]] = {size: [] for size in sizes}
    fpis: dict[int, list[float]] = {size: [] for size in sizes}
    admin = await asyncpg.connect(admin_url)
    with contextlib.suppress(asyncpg.PostgresError):
        await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    try:
        for size in sizes:  # warm up: connections, plans, caches
            await send_times(fks[size], [left[size].pop() for _ in range(warmup)])
        for number in range(args.rounds):
            order = sizes if number % 2 == 0 else list(reversed(sizes))
            for size in order:
                print(f"probe round {number + 1}/{args.rounds}: {size:,} waiting", file=sys.stderr)
                await quiesce(urls[size])
                database = f"bench_events_{size}"
                ms_before, calls_before, fpi_before = await send_event_exec(admin, database)
                times = await send_times(fks[size], [left[size].pop() for _ in range(args.sends)])
                rounds[size].append(median(times))
                ms_after, calls_after, fpi_after = await send_event_exec(admin, database)
                if calls_after > calls_before:
                    calls = calls_after - calls_before
                    server[size].append((ms_after - ms_before) / calls)
                    fpis[size].append((fpi_after - fpi_before) / calls)
    finally:
        await admin.close()
        for fk in fks.values():
            await fk.aclose()
    small, large = min(sizes), max(sizes)
    return {
        "rounds": {str(s): r for s, r in rounds.items()},
        "server_ms": {str(s): r for s, r in server.items()},
        "wal_fpi": {str(s): r for s, r in fpis.items()},
        "ratio": median([b / a for a, b in zip(rounds[small], rounds[large], strict=True)]),
        "plan": await probe_plan(urls[large], large),
        "small": small,
        "large": large,
    }


# burst ------------------------------------------------------------------------------
async def suspend_waiters(url: str, endpoint: str, count: int, concurrency: int) -> None:
    """``count`` waiter runs triggered through the endpoint, until all are waiting."""
    fk = FlowKeeper(url, KEY, endpoint, pool_size=10)
    fk.register(WORKFLOWS["waiter"])
    conn = await asyncpg.connect(url)
    try:
        await fk.migrate()
        await conn.execute("TRUNCATE flowkeeper.runs CASCADE")
        await conn.execute("TRUNCATE flowkeeper.event_log")
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with gate:
                await fk.trigger("waiter", i)

        await asyncio.gather(*(one(i) for i in range(count)))
        give_up = time.monotonic() + 120
        while (
            await conn.fetchval("SELECT count(*) FROM flowkeeper.runs WHERE status = 'waiting'")
            < count
        ):
            if time.monotonic() > give_up:
                raise RuntimeError("the waiter runs did not all suspend")
            await asyncio.sleep(0.05)
        await conn.execute("VACUUM ANALYZE flowkeeper.runs, flowkeeper.waits")
    finally:
        await conn.close()
        await fk.aclose()


async def run_burst(url: str, endpoint: str, count: int, concurrency: int) -> dict[str, float]:
    """Send one event per waiting run, all at once; time until every run completed."""
    fk = FlowKeeper(url, KEY, endpoint, pool_size=10)
    fk.register(WORKFLOWS["waiter"])
    watcher = await asyncpg.connect(url)
    stats = await DatabaseStats(url, settle=0).open()
    try:
        statements_before = await stats.statements()
        gate = asyncio.Semaphore(concurrency)
        woken = 0

        async def one(i: int) -> None:
            nonlocal woken
            async with gate:
                sent = await fk.send_event(EVENT, {"n": i})
                woken += len(sent.woken)

        polls = 0
        started = time.perf_counter()
        sending = asyncio.gather(*(one(i) for i in range(count)))
        while True:
            await asyncio.sleep(0.02)
            polls += 1
            done = await watcher.fetchval(
                "SELECT count(*) FROM flowkeeper.runs WHERE status = 'completed'"
            )
            if done >= count and sending.done():
                break
        elapsed = time.perf_counter() - started
        await sending
        statements_after = await stats.statements()
        assert woken == count, (woken, count)
        wrong = await watcher.fetchval(
            "SELECT count(*) FROM flowkeeper.runs WHERE output::text::int <> (input::text)::int + 1"
        )
        assert wrong == 0, f"{wrong} runs returned another event's data"
        result = {"elapsed": elapsed, "per_second": count / elapsed}
        if statements_before is not None and statements_after is not None:
            result["statements_per_event"] = (statements_after - statements_before - polls) / count
        return result
    finally:
        await stats.close()
        await watcher.close()
        await fk.aclose()


async def burst(args: argparse.Namespace, admin_url: str, dsn: Any) -> dict[str, Any]:
    await create_database(admin_url, "bench_events_burst")
    url = dsn("bench_events_burst")
    rounds: dict[str, list[dict[str, float]]] = {"plain": [], "burst": []}
    with served_app(url) as endpoint:
        await run_batch(url, endpoint, "three", args.warmup, args.concurrency, settle=0)
        await suspend_waiters(url, endpoint, args.warmup, args.concurrency)
        await run_burst(url, endpoint, args.warmup, args.concurrency)
        for number in range(args.rounds):
            order = ["plain", "burst"] if number % 2 == 0 else ["burst", "plain"]
            for part in order:
                print(f"burst round {number + 1}/{args.rounds}: {part}", file=sys.stderr)
                if part == "plain":
                    await quiesce(url)
                    rounds[part].append(
                        await run_batch(
                            url, endpoint, "three", args.events, args.concurrency, settle=0
                        )
                    )
                else:
                    await suspend_waiters(url, endpoint, args.events, args.concurrency)
                    await quiesce(url)
                    rounds[part].append(
                        await run_burst(url, endpoint, args.events, args.concurrency)
                    )
    pairs = zip(rounds["plain"], rounds["burst"], strict=True)
    return {
        "rounds": rounds,
        "ratio": median([b["per_second"] / p["per_second"] for p, b in pairs]),
    }


# the run ------------------------------------------------------------------------------
def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def render(args: argparse.Namespace, results: dict[str, Any]) -> str:
    lines: list[str] = []
    if "probe" in results:
        p = results["probe"]
        rows = []
        for size, medians in p["rounds"].items():
            inside = p["server_ms"][size]
            rows.append(
                [
                    f"{int(size):,}",
                    f"{median(medians) * 1000:.2f}",
                    f"{min(medians) * 1000:.2f}-{max(medians) * 1000:.2f}",
                    f"{median(inside):.3f}" if inside else "n/a",
                    f"{median(p['wal_fpi'][size]):.1f}" if inside else "n/a",
                ]
            )
        ok = p["ratio"] <= PROBE_TARGET
        lines += [
            f"send_event waking one run among N waiting runs: {args.sends} events one after "
            f"another per round, median per event, {args.rounds} interleaved rounds",
            "",
            table(
                rows,
                [
                    "waiting runs",
                    "ms/event (median)",
                    "rounds (per-round medians)",
                    "ms inside send_event (server)",
                    "WAL full-page images/event",
                ],
            ),
            "",
            f"ratio {p['large']:,} / {p['small']:,} waiting: {p['ratio']:.2f} (median of the "
            f"per-round ratios; target <= {PROBE_TARGET}: {_verdict(ok)})",
            "",
            f"plan of send_event's wait probe at {p['large']:,} waiting runs (auto_explain, "
            "nested statement, generic plan):",
            *("  " + line for line in p["plan"]),
            "",
        ]
    if "burst" in results:
        b = results["burst"]
        rows = []
        for part, label in (
            ("plain", "plain 3-step workflows (bench/core.py), runs/s"),
            ("burst", "events each waking its own waiting run, events/s"),
        ):
            rates = [r["per_second"] for r in b["rounds"][part]]
            rows.append([label, f"{median(rates):.0f}", f"{min(rates):.0f}-{max(rates):.0f}"])
        ok = b["ratio"] >= BURST_TARGET
        lines += [
            f"burst: {args.events} events at once ({args.concurrency} in flight), each waking "
            "its own run, pushed to the endpoint (uvicorn, 127.0.0.1), vs the plain workload; "
            f"{args.rounds} interleaved rounds",
            "",
            table(rows, ["workload", "per second (median)", "rounds"]),
            "",
            f"events/s as a fraction of plain workflows/s: {b['ratio']:.0%} (median of the "
            f"per-round ratios; target >= {BURST_TARGET:.0%}: {_verdict(ok)})",
        ]
        per_event = [r["statements_per_event"] for r in b["rounds"]["burst"]]
        if all(v is not None for v in per_event) and per_event:
            lines.append(
                f"round trips to Postgres per event, send to completion (pg_stat_statements): "
                f"{median(per_event):.2f}"
            )
        lines.append("")
    server = results["server"]
    lines += [
        f"machine: {machine()}",
        f"PostgreSQL {server['server_version']}: fsync={server['fsync']}, "
        f"synchronous_commit={server['synchronous_commit']}",
        "command: " + " ".join([interpreter(), "-m", "bench.events", *map(shlex.quote, args.argv)]),
    ]
    return "\n".join(lines)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with durable_cluster() as cluster:
        results["server"] = await server_facts(cluster.url)
        if args.only in (None, "probe"):
            results["probe"] = await probe(args, cluster.url, cluster.dsn)
        if args.only in (None, "burst"):
            results["burst"] = await burst(args, cluster.url, cluster.dsn)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] if __doc__ else None,
        epilog="Targets: probe ratio <= 1.3; burst >= 50%% of plain throughput.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: small sizes, one round")
    parser.add_argument("--only", choices=["probe", "burst"], help="run one part only")
    parser.add_argument(
        "--waiting",
        type=int,
        nargs=2,
        default=None,
        metavar=("SMALL", "LARGE"),
        help="waiting runs in the two probe databases (default 1000 100000)",
    )
    parser.add_argument("--sends", type=int, default=None, help="events per probe round (150)")
    parser.add_argument("--events", type=int, default=None, help="events per burst (1000)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (5)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs/events (100)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    quick = args.quick
    args.waiting = sorted(args.waiting or ([200, 2000] if quick else [1000, 100_000]))
    args.sends = args.sends or (20 if quick else 150)
    args.events = args.events or (50 if quick else 1000)
    args.rounds = args.rounds or (1 if quick else 5)
    args.warmup = args.warmup or (10 if quick else 100)
    results = asyncio.run(measure(args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print(render(args, results))


if __name__ == "__main__":
    main()
