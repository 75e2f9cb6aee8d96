"""How flowkeeper's cost grows: history, steps per run, payloads, bursts, latency.

    .venv/bin/python -m bench.growth                  # everything (about 8 minutes)
    .venv/bin/python -m bench.growth --only payloads  # or: history, steps, memory, burst,
                                                      #     latency, groupcommit, lean
    .venv/bin/python -m bench.growth --quick          # small sizes: a smoke test

Every section measures its cases side by side in one run, interleaved round by
round, and prints ratios (medians of the per-round ratios, with their range):

history      3-step workflows/s into an empty schema vs one holding 1,000,000
             finished runs (3,000,000 steps), filled with generate_series.
steps        one run of 100 / 1,000 / 20,000 trivial steps with a 1 s time
             budget (so many invocations, each replaying the history): the
             median gap between steps in the last 10 % over the first 10 %.
payloads     3-step workflows/s whose steps return (and pass on) 100 B, 10 KB
             and 500 KB of text, as ratios to 100 B.
memory       peak RSS of the endpoint process (a fresh uvicorn each) running
             one step whose result is 50 MB and 200 MB of text.
burst        10,000 runs triggered at once: time to complete, peak connections
             to Postgres, errors.
latency      trigger-to-completion p50/p99 of a 3-step workflow at concurrency
             1 and 64 (completion: the run's finished_at, same clock).
groupcommit  3-step workflows/s and commits per workflow with group commit on
             and off (two endpoints, interleaved).
lean         3-step workflows/s by write path: a group commit batch's lean step
             writes as one statement (the default), the lean statement per
             write (no events to write: commit_lean), the full commit statement
             per write.

Runs on a private PostgreSQL with default durability (fsync on).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import asyncpg

from flowkeeper import FlowKeeper

from .apps.workflows import WORKFLOWS
from .common import (
    KEY,
    SERVED_PIDS,
    DatabaseStats,
    durable_cluster,
    interpreter,
    median,
    quiesce,
    served_app,
    table,
)

SECTIONS = ("history", "steps", "payloads", "memory", "burst", "latency", "groupcommit", "lean")


# plumbing -----------------------------------------------------------------------------
async def create_database(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    fk = FlowKeeper(url, KEY)
    try:
        await fk.migrate()
    finally:
        await fk.aclose()
    return url


def trigger_side(url: str, endpoint: str, workflow: str) -> FlowKeeper:
    fk = FlowKeeper(url, KEY, endpoint, pool_size=10)
    fk.register(WORKFLOWS[workflow])
    return fk


async def run_many(
    url: str,
    endpoint: str,
    workflow: str,
    inputs: Sequence[Any],
    concurrency: int,
    *,
    limit: float = 600,
    count_commits: bool = False,
) -> dict[str, Any]:
    """Trigger one run per input, wait until all completed; never truncates history.

    ``count_commits`` waits for Postgres's statistics to settle before and
    after (about 10 s each), so that ``commits_per_run`` is exact.
    """
    fk = trigger_side(url, endpoint, workflow)
    watcher = await asyncpg.connect(url)
    stats = await DatabaseStats(url, settle=None if count_commits else 0).open()
    try:
        semaphore = asyncio.Semaphore(concurrency)
        starts: dict[str, float] = {}

        async def one(value: Any) -> str:
            async with semaphore:
                began = time.time()
                handle = await fk.trigger(workflow, value)
                starts[handle.run_id] = began
                return handle.run_id

        commits_before = await stats.settled_commits()
        polls = 0
        started = time.perf_counter()
        triggering = asyncio.gather(*(one(v) for v in inputs), return_exceptions=True)
        peak_connections = 0
        next_tick = time.perf_counter() + 2
        while True:
            await asyncio.sleep(0.02)
            polls += 2  # the watcher's own two statements below
            if triggering.done():
                ids = [i for i in triggering.result() if isinstance(i, str)]
                left = await watcher.fetchval(
                    "SELECT count(*) FROM flowkeeper.runs "
                    "WHERE id = ANY($1::uuid[]) AND status <> 'completed'",
                    ids,
                )
                if not left:
                    break
            peak_connections = max(
                peak_connections,
                await watcher.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                ),
            )
            now = time.perf_counter()
            if now > next_tick:  # pushes that did not get through are due for a tick
                await fk.tick()
                next_tick = now + 2
            if now - started > limit:
                raise RuntimeError(f"runs did not complete within {limit:.0f} s")
        elapsed = time.perf_counter() - started
        errors = [e for e in triggering.result() if not isinstance(e, str)]
        # The watcher's polls are transactions of this database too.
        commits = await stats.settled_commits() - commits_before - polls
        rows = await watcher.fetch(
            "SELECT id::text AS id, finished_at FROM flowkeeper.runs WHERE id = ANY($1::uuid[])",
            ids,
        )
        latencies = [r["finished_at"].timestamp() - starts[r["id"]] for r in rows]
        return {
            "elapsed": elapsed,
            "per_second": len(inputs) / elapsed,
            "errors": len(errors),
            "peak_connections": peak_connections,
            "commits_per_run": commits / len(inputs),
            "latencies": latencies,
        }
    finally:
        await stats.close()
        await watcher.close()
        await fk.aclose()


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


@contextmanager
def env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# sections -----------------------------------------------------------------------------
async def history(admin_url: str, args: argparse.Namespace) -> list[list[str]]:
    empty = await create_database(admin_url, "growth_empty")
    full = await create_database(admin_url, "growth_full")
    n_hist = 20_000 if args.quick else 1_000_000
    conn = await asyncpg.connect(full)
    try:
        began = time.perf_counter()
        await conn.execute("ALTER TABLE flowkeeper.runs DISABLE TRIGGER runs_notify_due")
        await conn.execute(
            """INSERT INTO flowkeeper.runs (id, workflow, status, input, output, created_at,
                                            started_at, finished_at, invocations)
               SELECT gen_random_uuid(), 'three', 'completed', to_json(g), to_json(g + 3),
                      now() - interval '30 days' + g * interval '1 second',
                      now() - interval '30 days', now() - interval '30 days', 1
               FROM generate_series(1, $1) AS g""",
            n_hist,
        )
        await conn.execute(
            """INSERT INTO flowkeeper.steps (run_id, key, position, name, kind, status, input,
                                             output, attempts, started_at, finished_at)
               SELECT r.id, s.name, s.pos, s.name, 'step', 'completed', NULL, r.output, 1,
                      r.started_at, r.finished_at
               FROM flowkeeper.runs r,
                    (VALUES (0, 'one'), (1, 'two'), (2, 'three')) AS s(pos, name)"""
        )
        await conn.execute("ALTER TABLE flowkeeper.runs ENABLE TRIGGER runs_notify_due")
        await conn.execute("VACUUM ANALYZE")
        fill = time.perf_counter() - began
    finally:
        await conn.close()
    n = args.workflows
    rates: dict[str, list[float]] = {"empty": [], "full": []}
    with served_app(empty) as ep_empty, served_app(full) as ep_full:
        for url, ep in ((empty, ep_empty), (full, ep_full)):
            await run_many(url, ep, "three", range(100), 64)  # warm up
        for r in range(args.rounds):
            for label, url, ep in (("empty", empty, ep_empty), ("full", full, ep_full)):
                print(f"history round {r + 1}: {label}", file=sys.stderr)
                await quiesce(url)
                rates[label].append((await run_many(url, ep, "three", range(n), 64))["per_second"])
    ratios = [f / e for f, e in zip(rates["full"], rates["empty"], strict=True)]
    return [
        ["history: empty schema, workflows/s", spread(rates["empty"], "{:.0f}")],
        [f"history: {n_hist:,} finished runs (filled in {fill:.0f} s), workflows/s",
         spread(rates["full"], "{:.0f}")],
        ["history: full / empty (target >= 0.95)", spread(ratios)],
    ]  # fmt: skip


async def steps(admin_url: str, args: argparse.Namespace) -> list[list[str]]:
    url = await create_database(admin_url, "growth_steps")
    sizes = (100, 1_000, 2_000) if args.quick else (100, 1_000, 20_000)
    fk = FlowKeeper(url, KEY, time_budget=1.0)
    fk.register(WORKFLOWS["many"])
    rows = []
    try:
        for size in sizes:
            handle = await fk.trigger("many", size)
            began = time.perf_counter()
            invocations = 0
            while (await fk.get_run(handle.run_id)).status.value != "completed":
                await fk.advance(handle.run_id)
                invocations += 1
            elapsed = time.perf_counter() - began
            async with fk.db.acquire() as conn:
                starts: list[datetime] = [
                    r["started_at"]
                    for r in await conn.fetch(
                        "SELECT started_at FROM flowkeeper.steps WHERE run_id = $1 "
                        "ORDER BY position",
                        uuid.UUID(handle.run_id),
                    )
                ]
            gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
            tenth = max(1, len(gaps) // 10)
            first, last = median(gaps[:tenth]), median(gaps[-tenth:])
            ratio = last / first if first > 0 else float("nan")
            rows.append(
                [f"steps: {size:,} steps, {invocations} invocations, {elapsed:.1f} s; "
                 "last-10% / first-10% step gap (target <= 1.1)",
                 f"{ratio:.2f} ({first * 1e6:.0f} -> {last * 1e6:.0f} us)"]
            )  # fmt: skip
    finally:
        await fk.aclose()
    return rows


async def payloads(admin_url: str, args: argparse.Namespace) -> list[list[str]]:
    url = await create_database(admin_url, "growth_payloads")
    sizes = {"100 B": 100, "10 KB": 10_000, "500 KB": 500_000}
    counts = {"100 B": args.workflows, "10 KB": args.workflows, "500 KB": args.workflows // 5}
    rates: dict[str, list[float]] = {k: [] for k in sizes}
    with served_app(url) as ep:
        await run_many(url, ep, "payload", [100] * 50, 64)
        for r in range(args.rounds):
            for label, size in sizes.items():
                print(f"payloads round {r + 1}: {label}", file=sys.stderr)
                await quiesce(url)
                result = await run_many(url, ep, "payload", [size] * counts[label], 64)
                rates[label].append(result["per_second"])
    rows = [[f"payloads: {k} steps, workflows/s", spread(v, "{:.0f}")] for k, v in rates.items()]
    for label, target in (("10 KB", 0.9), ("500 KB", 0.12)):
        ratios = [a / b for a, b in zip(rates[label], rates["100 B"], strict=True)]
        rows.append([f"payloads: {label} / 100 B (target >= {target})", spread(ratios)])
    return rows


async def memory(admin_url: str, args: argparse.Namespace) -> list[list[str]]:
    url = await create_database(admin_url, "growth_memory")
    rows = []
    for mb in (5, 20) if args.quick else (50, 200):
        with served_app(url) as ep:
            pid = SERVED_PIDS[ep]
            before = _rss_peak(pid)
            await run_many(url, ep, "big", [mb * 1_000_000], 1, limit=300)
            peak = _rss_peak(pid)
        rows.append(
            [f"memory: endpoint peak RSS, one {mb} MB step result (target: 700 MB at 200 MB)",
             f"{peak / 1e6:.0f} MB ({peak / (mb * 1e6):.1f}x; {before / 1e6:.0f} MB before)"]
        )  # fmt: skip
    return rows


def _rss_peak(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


async def burst(admin_url: str, args: argparse.Namespace) -> list[list[str]]:
    url = await create_database(admin_url, "growth_burst")
    n = 1_000 if args.quick else 10_000
    with served_app(url) as ep:
        await run_many(url, ep, "three", range(100), 64)
        result = await run_many(url, ep, "three", range(n), n)
    return [
        [f"burst: {n:,} runs triggered at once, seconds to complete", f"{result['elapsed']:.1f}"],
        ["burst: peak connections to Postgres", str(result["peak_connections"])],
        ["burst: errors", str(result["errors"])],
    ]


async def latency(admin_url: str, args: argparse.Namespace) -> list[list[str]]:
    url = await create_database(admin_url, "growth_latency")
    rows = []
    with served_app(url) as ep:
        await run_many(url, ep, "three", range(100), 64)
        for concurrency, n in ((1, 200), (64, args.workflows)):
            lat = (await run_many(url, ep, "three", range(n), concurrency))["latencies"]
            rows.append(
                [f"latency: trigger to completion at concurrency {concurrency}, p50 / p99",
                 f"{pct(lat, 0.5) * 1000:.1f} / {pct(lat, 0.99) * 1000:.1f} ms"]
            )  # fmt: skip
    return rows


async def groupcommit(admin_url: str, args: argparse.Namespace) -> list[list[str]]:
    on_url = await create_database(admin_url, "growth_gc_on")
    off_url = await create_database(admin_url, "growth_gc_off")
    rates: dict[str, list[float]] = {"on": [], "off": []}
    commits: dict[str, list[float]] = {"on": [], "off": []}
    with (
        env(FLOWKEEPER_GROUP_COMMIT="1"),
        served_app(on_url) as ep_on,
        env(FLOWKEEPER_GROUP_COMMIT="0"),
        served_app(off_url) as ep_off,
    ):
        for url, ep in ((on_url, ep_on), (off_url, ep_off)):
            await run_many(url, ep, "three", range(100), 64)
        for r in range(args.rounds):
            for label, url, ep in (("on", on_url, ep_on), ("off", off_url, ep_off)):
                print(f"group commit round {r + 1}: {label}", file=sys.stderr)
                await quiesce(url)
                res = await run_many(
                    url, ep, "three", range(args.workflows), 64, count_commits=True
                )
                rates[label].append(res["per_second"])
                commits[label].append(res["commits_per_run"])
        conc1 = {}
        for label, url, ep in (("on", on_url, ep_on), ("off", off_url, ep_off)):
            res = await run_many(url, ep, "three", range(100), 1, count_commits=True)
            conc1[label] = res["commits_per_run"]
    ratios = [a / b for a, b in zip(rates["on"], rates["off"], strict=True)]
    return [
        ["group commit on: workflows/s", spread(rates["on"], "{:.0f}")],
        ["group commit off: workflows/s", spread(rates["off"], "{:.0f}")],
        ["group commit: on / off", spread(ratios)],
        ["commits per 3-step workflow at concurrency 64: on (target <= 3) / off",
         f"{median(commits['on']):.2f} / {median(commits['off']):.2f}"],
        ["commits per 3-step workflow at concurrency 1: on (target <= 4) / off",
         f"{conc1['on']:.2f} / {conc1['off']:.2f}"],
    ]  # fmt: skip


async def lean(admin_url: str, args: argparse.Namespace) -> list[list[str]]:
    paths = ("merged", "lean", "full")
    urls = {p: await create_database(admin_url, f"growth_write_{p}") for p in paths}
    rates: dict[str, list[float]] = {p: [] for p in paths}
    with (
        env(FLOWKEEPER_BENCH_WRITE_PATH="merged"),
        served_app(urls["merged"]) as ep_merged,
        env(FLOWKEEPER_BENCH_WRITE_PATH="lean"),
        served_app(urls["lean"]) as ep_lean,
        env(FLOWKEEPER_BENCH_WRITE_PATH="full"),
        served_app(urls["full"]) as ep_full,
    ):
        endpoints = {"merged": ep_merged, "lean": ep_lean, "full": ep_full}
        for p in paths:
            await run_many(urls[p], endpoints[p], "three", range(100), 64)
        for r in range(args.rounds):
            for p in paths[r % 3 :] + paths[: r % 3]:  # each path first in turn
                print(f"write path round {r + 1}: {p}", file=sys.stderr)
                await quiesce(urls[p])
                res = await run_many(urls[p], endpoints[p], "three", range(args.workflows), 64)
                rates[p].append(res["per_second"])

    def ratio(a: str, b: str) -> str:
        return spread([x / y for x, y in zip(rates[a], rates[b], strict=True)])

    def rate(p: str) -> str:
        return spread(rates[p], "{:.0f}")

    return [
        ["write path: batch as one statement (default), workflows/s", rate("merged")],
        ["write path: lean statement per write, workflows/s", rate("lean")],
        ["write path: full commit statement per write, workflows/s", rate("full")],
        ["write path: lean / full", ratio("lean", "full")],
        ["write path: one statement per batch / lean per write", ratio("merged", "lean")],
    ]  # fmt: skip


RUNNERS = {
    "history": history,
    "steps": steps,
    "payloads": payloads,
    "memory": memory,
    "burst": burst,
    "latency": latency,
    "groupcommit": groupcommit,
    "lean": lean,
}


async def main_async(args: argparse.Namespace) -> None:
    rows: list[list[str]] = []
    with durable_cluster() as cluster:
        for name in args.only or SECTIONS:
            print(f"== {name}", file=sys.stderr)
            rows += await RUNNERS[name](cluster.url, args)
            print(table(rows[-1:], ["figure", "value"]), file=sys.stderr)
    print()
    print(table(rows, ["figure", "value"]))
    print(f"\nload {os.getloadavg()[0]:.1f} at the end; cores: {os.cpu_count()}")
    print("command: " + " ".join([interpreter(), "-m", "bench.growth", *sys.argv[1:]]))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", choices=SECTIONS)
    parser.add_argument("--workflows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.workflows = min(args.workflows, 200)
        args.rounds = 1
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
