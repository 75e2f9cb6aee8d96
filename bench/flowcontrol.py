"""Flow-control figures: the claim with a million queued runs, limits that do not bind,
retention while runs are created.

    .venv/bin/python -m bench.flowcontrol            # the issue's sizes (a few minutes)
    .venv/bin/python -m bench.flowcontrol --quick    # a smoke test (under a minute)

claim       the claim path per batch of 200 due runs (the scheduler's claim_due,
            then claim_run, flow_gate included, for each run as the endpoint
            does): 10,000 queued runs over 10,000 concurrency keys, against
            1,000,000 queued runs over the same 10,000 keys (10,000 due, one per
            key; the rest parked behind them).  Target: ratio <= 1.3 (the claim
            is O(due runs): parked runs are out of runs_due_idx).
limits      three-step workflows/s through a real endpoint, with a concurrency
            limit per key declared that never binds (and, shown apart, with a
            global limit as well), against the same workflow without limits,
            in interleaved rounds.  Target >= 90 %.
retention   the same plain workflows/s while 1,000,000 finished runs past
            their retention are deleted, against without.  Target >= 80 %.
            Twice: as a driver ticking every 10 ms (a scheduler loop under
            load) prunes them, a batch per tick at most Scheduler.RETAIN_SHARE
            of its time, against the same ticks with a policy that keeps the
            backlog; and back to back (prune_runs with no pause, as
            `flowkeeper runs prune` by hand does) against not pruning.

A private PostgreSQL with default durability, or BENCH_DATABASE_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import asyncpg

from flowkeeper import FlowKeeper

from .common import KEY, durable_cluster, interpreter, median, served_app, table
from .core import run_batch

BATCH = 200
#: How often the retention figure's driver ticks: a scheduler loop under load.
TICK_EVERY = 0.01


async def create_database(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


async def fill_queued(url: str, total: int, keys: int) -> None:
    """``total`` queued runs over ``keys`` keys: one due per key, the rest parked behind it."""
    fk = FlowKeeper(url, KEY, None)
    await fk.migrate()
    await fk.aclose()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """INSERT INTO flowkeeper.runs (id, workflow, status, input, due_at, flow_keys,
                                            flow_limits, blocked_key)
               SELECT gen_random_uuid(), 'limited', 'queued', '1'::json,
                      CASE WHEN i <= $2 THEN now() - interval '1 second' END,
                      ARRAY['wf:limited:k' || (i % $2)], ARRAY[1],
                      CASE WHEN i > $2 THEN 'wf:limited:k' || (i % $2) END
               FROM generate_series(1, $1::integer) AS i""",
            total,
            keys,
        )
        await conn.execute("VACUUM ANALYZE flowkeeper.runs")
    finally:
        await conn.close()


async def claim_batches(url: str, batches: int) -> list[float]:
    """Seconds per batch: claim_due of BATCH runs, then claim_run of each (the gate)."""
    fk = FlowKeeper(url, KEY, None, pool_size=4)
    times: list[float] = []
    try:
        for _ in range(batches):
            t0 = time.perf_counter()
            rows = await fk.store.claim_due(BATCH, timedelta(seconds=30))
            for r in rows:
                claimed = await fk.store.claim(
                    str(r["id"]), r["lease_token"], uuid.uuid4(), timedelta(seconds=30)
                )
                assert claimed is not None
            times.append(time.perf_counter() - t0)
            assert len(rows) == BATCH, len(rows)
    finally:
        await fk.aclose()
    return times


async def claim_part(args: argparse.Namespace, admin_url: str) -> dict[str, Any]:
    small, large, keys = args.small, args.large, args.keys
    result: dict[str, Any] = {}
    for name, total in (("small", small), ("large", large)):
        print(f"claim: filling {total:,} queued runs over {keys:,} keys", file=sys.stderr)
        url = await create_database(admin_url, f"fc_claim_{name}")
        await fill_queued(url, total, keys)
        result[name] = url
    batches = keys // BATCH
    per: dict[str, list[float]] = {"small": [], "large": []}
    for rnd in range(args.rounds):
        print(f"claim round {rnd + 1}/{args.rounds}", file=sys.stderr)
        for name in ("small", "large"):
            # Each round claims a fresh share of the due runs (batches // rounds).
            per[name] += await claim_batches(result[name], max(1, batches // args.rounds))
    return {
        "small": small,
        "large": large,
        "keys": keys,
        "small_ms": median(per["small"]) * 1000,
        "large_ms": median(per["large"]) * 1000,
    }


async def timed_batch(url: str, endpoint: str, workflow: str, count: int) -> float:
    """Workflows/s: trigger ``count`` runs (32 at once), until all of them completed."""
    from .apps.workflows import WORKFLOWS

    fk = FlowKeeper(url, KEY, endpoint, pool_size=10)
    fk.register(WORKFLOWS[workflow])
    watcher = await asyncpg.connect(url)
    try:
        await watcher.execute("DELETE FROM flowkeeper.runs WHERE workflow = $1", workflow)
        semaphore = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with semaphore:
                await fk.trigger(workflow, i)

        t0 = time.perf_counter()
        triggering = asyncio.gather(*(one(i) for i in range(count)))
        while True:
            await asyncio.sleep(0.02)
            done = await watcher.fetchval(
                "SELECT count(*) FROM flowkeeper.runs WHERE workflow = $1 AND status = 'completed'",
                workflow,
            )
            if done >= count and triggering.done():
                break
        elapsed = time.perf_counter() - t0
        await triggering
        return count / elapsed
    finally:
        await watcher.close()
        await fk.aclose()


async def throughput_part(args: argparse.Namespace, admin_url: str) -> dict[str, Any]:
    url = await create_database(admin_url, "fc_throughput")
    fk = FlowKeeper(url, KEY, None)
    await fk.migrate()
    await fk.aclose()
    plain: list[float] = []
    limited: list[float] = []
    global_: list[float] = []
    pruning: list[float] = []
    pruned: list[int] = []
    looped: list[float] = []
    backlog: list[float] = []
    loop_pruning: list[float] = []
    loop_pruned: list[int] = []
    with served_app(url) as endpoint:
        await run_batch(url, endpoint, "three", args.warmup, 32)
        for rnd in range(args.rounds):
            print(f"throughput round {rnd + 1}/{args.rounds}", file=sys.stderr)
            await fill_finished(url, 0)  # settled: vacuumed, checkpointed
            # Each round in another order, so that no workload always goes first.
            batches = [("three", plain), ("three-limited", limited), ("three-global", global_)]
            for workflow, rates in batches[rnd % 3 :] + batches[: rnd % 3]:
                rates.append(await timed_batch(url, endpoint, workflow, args.runs))
            # Retention: the same backlog with pruning and without (its policy
            # then keeps everything), the two in alternating order.
            await fill_finished(url, args.finished)
            for pruning_now in (rnd % 2 == 0, rnd % 2 == 1):
                await keep_cancelled(url, timedelta(days=7 if pruning_now else 36_500))
                if pruning_now:
                    rate, deleted = await with_pruning(url, endpoint, args)
                    pruning.append(rate)
                    pruned.append(deleted)
                    rate, deleted = await with_ticks(url, endpoint, args)
                    loop_pruning.append(rate)
                    loop_pruned.append(deleted)
                else:
                    backlog.append(await timed_batch(url, endpoint, "three", args.runs))
                    looped.append((await with_ticks(url, endpoint, args))[0])
    return {
        "plain": median(plain),
        "limited": median(limited),
        "global": median(global_),
        "pruning": median(pruning),
        "finished": args.finished,
        "deleted": median(pruned),
        "looped": median(looped),
        "backlog": median(backlog),
        "loop_pruning": median(loop_pruning),
        "loop_deleted": median(loop_pruned),
        # Per round, each ratio of two batches run side by side in that round.
        "ratios": {
            "limited": [a / b for a, b in zip(limited, plain, strict=True)],
            "global": [a / b for a, b in zip(global_, plain, strict=True)],
            "ticks": [a / b for a, b in zip(loop_pruning, looped, strict=True)],
            "pruning": [a / b for a, b in zip(pruning, backlog, strict=True)],
        },
    }


def spread(ratios: Sequence[float]) -> str:
    """Median and range of per-round ratios, as percentages."""
    return f"{median(ratios):.0%} (rounds {min(ratios):.0%} to {max(ratios):.0%})"


async def fill_finished(url: str, count: int) -> None:
    """``count`` cancelled runs finished 30 days ago, and only them; vacuumed, checkpointed."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DELETE FROM flowkeeper.runs WHERE workflow = 'old'")
        await conn.execute(
            """INSERT INTO flowkeeper.runs (id, workflow, status, finished_at)
               SELECT gen_random_uuid(), 'old', 'cancelled', now() - interval '30 days'
               FROM generate_series(1, $1::integer)""",
            count,
        )
        await conn.execute("VACUUM ANALYZE flowkeeper.runs")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def keep_cancelled(url: str, period: timedelta) -> None:
    """The default retention policy: cancelled runs kept ``period``."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """INSERT INTO flowkeeper.retention (workflow, cancelled) VALUES ('', $1)
               ON CONFLICT (workflow) DO UPDATE SET cancelled = excluded.cancelled""",
            period,
        )
    finally:
        await conn.close()


async def old_runs(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM flowkeeper.runs WHERE workflow = 'old'")
        )
    finally:
        await conn.close()


async def with_ticks(url: str, endpoint: str, args: argparse.Namespace) -> tuple[float, int]:
    """Plain workflows/s while a driver ticks every TICK_EVERY s (and prunes what is past
    retention, at most Scheduler.RETAIN_SHARE of its time, as a busy scheduler loop does)."""
    before = await old_runs(url)
    fk = FlowKeeper(url, KEY, endpoint, pool_size=2)
    stop = asyncio.Event()
    ticks = 0

    async def drive() -> None:
        nonlocal ticks
        while not stop.is_set():
            await fk.tick()
            ticks += 1
            await asyncio.sleep(TICK_EVERY)

    task = asyncio.create_task(drive())
    try:
        rate = await timed_batch(url, endpoint, "three", args.runs)
    finally:
        stop.set()
        await task
        await fk.aclose()
    deleted = before - await old_runs(url)
    print(f"  a driver ticked {ticks} times, deleting {deleted:,}", file=sys.stderr)
    return rate, deleted


async def with_pruning(url: str, endpoint: str, args: argparse.Namespace) -> tuple[float, int]:
    """Plain workflows/s while old finished runs are pruned back to back, with no pause."""
    stop = asyncio.Event()
    deleted = 0

    async def prune() -> None:
        nonlocal deleted
        pconn = await asyncpg.connect(url)
        try:
            while not stop.is_set():
                n = await pconn.fetchval("SELECT flowkeeper.prune_runs(500)")
                deleted += n
                if n == 0:
                    await asyncio.sleep(0.01)
        finally:
            await pconn.close()

    task = asyncio.create_task(prune())
    try:
        rate = await timed_batch(url, endpoint, "three", args.runs)
    finally:
        stop.set()
        await task
    print(f"  pruned {deleted:,} old runs during the batch", file=sys.stderr)
    return rate, deleted


def render(args: argparse.Namespace, r: dict[str, Any]) -> str:
    out = []
    if "claim" in r:
        c = r["claim"]
        ratio = c["large_ms"] / c["small_ms"]
        out.append(
            table(
                [
                    [f"{c['small']:,}", f"{c['small_ms']:.1f}"],
                    [f"{c['large']:,}", f"{c['large_ms']:.1f}"],
                ],
                [f"queued runs over {c['keys']:,} keys", f"ms per claim batch of {BATCH}"],
            )
        )
        out.append(f"ratio {c['large']:,} / {c['small']:,} queued: {ratio:.2f} (target <= 1.3)")
    if "throughput" in r:
        t = r["throughput"]
        out.append(
            table(
                [
                    ["three steps, no limits", f"{t['plain']:.0f}"],
                    ["three steps, a limit per key declared (not binding)", f"{t['limited']:.0f}"],
                    [
                        "three steps, per key + one global limit (not binding)",
                        f"{t['global']:.0f}",
                    ],
                    [
                        f"three steps, while pruning back to back ({t['deleted']:,.0f} of "
                        f"{t['finished']:,} old runs deleted meanwhile)",
                        f"{t['pruning']:.0f}",
                    ],
                    [
                        f"three steps, {t['finished']:,} old runs past retention, not pruning",
                        f"{t['backlog']:.0f}",
                    ],
                    [
                        "three steps, the same, a driver ticking every 10 ms",
                        f"{t['looped']:.0f}",
                    ],
                    [
                        f"three steps, its ticks pruning ({t['loop_deleted']:,.0f} of "
                        f"{t['finished']:,} deleted meanwhile)",
                        f"{t['loop_pruning']:.0f}",
                    ],
                ],
                ["workload", "workflows/s"],
            )
        )
        q = t["ratios"]
        out.append(f"limits declared / none: {spread(q['limited'])} (target >= 90%)")
        out.append(
            f"with a global limit too / none: {spread(q['global'])} (every claim and "
            "release of that one key is serialised through its commit)"
        )
        out.append(
            f"while the ticks prune / the same ticks not pruning: "
            f"{spread(q['ticks'])} (target >= 80%)"
        )
        out.append(
            f"while pruning back to back / not pruning: {spread(q['pruning'])} "
            "(a backend's CPU taken from the runs)"
        )
    argv = " ".join(shlex.quote(a) for a in (args.argv or []))
    out.append(f"command: {interpreter()} -m bench.flowcontrol {argv}".rstrip())
    return "\n\n".join(out)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with durable_cluster() as cluster:
        if args.only in (None, "claim"):
            results["claim"] = await claim_part(args, cluster.url)
        if args.only in (None, "throughput"):
            results["throughput"] = await throughput_part(args, cluster.url)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.flowcontrol", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke test: small sizes")
    parser.add_argument("--only", choices=["claim", "throughput"], help="run one part only")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3)")
    parser.add_argument("--runs", type=int, default=None, help="workflows per batch (1000)")
    parser.add_argument(
        "--finished", type=int, default=None, help="old finished runs to prune (1,000,000)"
    )
    args = parser.parse_args(argv)
    runs, finished = args.runs, args.finished
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.small, args.large, args.keys = 400, 4_000, 400
        args.runs, args.warmup, args.finished = 60, 10, 5_000
        args.rounds = args.rounds or 1
    else:
        args.small, args.large, args.keys = 10_000, 1_000_000, 10_000
        args.runs, args.warmup, args.finished = 1_000, 100, 1_000_000
        args.rounds = args.rounds or 3
    args.runs = runs or args.runs
    args.finished = finished or args.finished
    print(render(args, asyncio.run(measure(args))))


if __name__ == "__main__":
    main()
