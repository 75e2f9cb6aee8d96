"""Composition figures: parallel steps, a fan-out to child runs, a parent's wake-up cost.

    .venv/bin/python -m bench.composition            # all three (a few minutes)
    .venv/bin/python -m bench.composition --quick    # a smoke test (under a minute)

gather   a workflow gathering 20 steps of 50 ms I/O each, against the same
         workflow with one such step: wall time from trigger to completed,
         through the endpoint (uvicorn in a subprocess), medians of
         interleaved rounds (target: 20 branches < 3x one branch, not 20x).
fanout   a parent starting 1,000 trivial children (one step each), all live
         at once, each pushed as its own invocation, and waiting for them:
         children/s against the plain three-step workflows/s of bench/core.py
         in the same interleaved rounds (target: >= 50 %).
wake     the cost a child's end adds to make its parent due, with the parent
         waiting on 10 and on 1,000 children: each child is advanced in this
         process and its finishing invocation timed (median ms, and the ratio
         1,000 / 10: target ~1, i.e. O(1) per wake, never a scan of the
         children), with the parent's own final resumption for reference
         (which reads the children's results once: O(children) by nature).

A private PostgreSQL with default durability (fsync and synchronous_commit
on), or BENCH_DATABASE_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import asyncpg

from flowkeeper import FlowKeeper

from .apps.workflows import WORKFLOWS
from .common import KEY, durable_cluster, interpreter, median, served_app, table
from .core import run_batch

GATHER_TARGET = 3.0
FANOUT_TARGET = 0.5


async def _fresh(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE flowkeeper.runs CASCADE")
    finally:
        await conn.close()


async def one_run(url: str, endpoint: str, workflow: str, value: int, timeout: float) -> float:
    """Trigger one run through the endpoint; seconds until it completed."""
    fk = FlowKeeper(url, KEY, endpoint, pool_size=4)
    for wf in WORKFLOWS.values():
        fk.register(wf)
    watcher = await asyncpg.connect(url)
    try:
        await fk.migrate()
        started = time.perf_counter()
        handle = await fk.trigger(workflow, value)
        deadline = started + timeout
        while True:
            status = await watcher.fetchval(
                "SELECT status FROM flowkeeper.runs WHERE id = $1", handle.run_id
            )
            if status == "completed":
                return time.perf_counter() - started
            if status in ("failed", "cancelled") or time.perf_counter() > deadline:
                raise RuntimeError(f"{workflow} run ended {status}")
            await fk.tick()  # children held back or pushes lost are due: never stuck
            await asyncio.sleep(0.005)
    finally:
        await watcher.close()
        await fk.aclose()


async def wake_costs(url: str, children: int) -> tuple[float, float]:
    """Median ms of a child's finishing invocation, and the parent's last resumption (ms)."""
    await _fresh(url)
    fk = FlowKeeper(url, KEY, None, pool_size=4)
    for wf in WORKFLOWS.values():
        fk.register(wf)
    conn = await asyncpg.connect(url)
    try:
        handle = await fk.trigger("fanout", children)
        await fk.advance(handle.run_id)  # starts the children, then waits
        ids = [
            str(r["id"])
            for r in await conn.fetch(
                "SELECT id FROM flowkeeper.runs WHERE parent_id = $1 ORDER BY created_at",
                handle.run_id,
            )
        ]
        assert len(ids) == children
        times = []
        for child in ids:
            started = time.perf_counter()
            await fk.advance(child)
            times.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        result = await fk.advance(handle.run_id)
        parent_ms = (time.perf_counter() - started) * 1000
        assert getattr(result, "outcome", None) == "completed", result
        return median(times[len(times) // 10 :]), parent_ms
    finally:
        await conn.close()
        await fk.aclose()


async def main_async(args: argparse.Namespace) -> None:
    rounds = 1 if args.quick else args.rounds
    width = 50 if args.quick else 1000
    with durable_cluster() as cluster:
        url = cluster.url
        with served_app(url, pool_size=10) as endpoint:
            await run_batch(url, endpoint, "three", 50, 64)  # warm up
            await one_run(url, endpoint, "gather20", 0, 60)
            one: list[float] = []
            twenty: list[float] = []
            plain: list[float] = []
            fan: list[float] = []
            for _ in range(rounds):
                for _ in range(3 if args.quick else 5):
                    one.append(await one_run(url, endpoint, "gather1", 0, 60))
                    twenty.append(await one_run(url, endpoint, "gather20", 0, 60))
                await _fresh(url)
                batch = await run_batch(url, endpoint, "three", width, 64)
                plain.append(batch["per_second"])
                await _fresh(url)
                fan.append(width / await one_run(url, endpoint, "fanout", width, 300))
        small = await wake_costs(url, 10)
        large = await wake_costs(url, 100 if args.quick else 1000)

    gather_ratio = median(twenty) / median(one)
    fan_ratio = median(fan) / median(plain)
    print()
    print(
        table(
            [
                ["1 step of 50 ms", f"{median(one) * 1000:.0f}"],
                ["asyncio.gather of 20 such steps", f"{median(twenty) * 1000:.0f}"],
            ],
            ["gather workload", "ms trigger -> completed (median)"],
        )
    )
    print(f"20 branches / 1 branch: {gather_ratio:.2f}x (target < {GATHER_TARGET:.0f}x)")
    print()
    print(
        table(
            [
                [f"{width} x plain three-step workflow", f"{median(plain):.0f}"],
                [f"1 parent fanning out to {width} trivial children", f"{median(fan):.0f}"],
            ],
            ["fan-out workload", "runs/s (median)"],
        )
    )
    print(
        f"children/s as a fraction of plain workflows/s: {fan_ratio:.0%} "
        f"(target >= {FANOUT_TARGET:.0%})"
    )
    print()
    large_n = 100 if args.quick else 1000
    print(
        table(
            [
                ["10", f"{small[0]:.2f}", f"{small[1]:.1f}"],
                [f"{large_n:,}", f"{large[0]:.2f}", f"{large[1]:.1f}"],
            ],
            ["children", "ms per child end (wakes its parent)", "ms parent's final resumption"],
        )
    )
    print(f"per-wake ratio {large_n:,} / 10 children: {large[0] / small[0]:.2f} (target ~1: O(1))")
    command = " ".join([interpreter(), "-m", "bench.composition", *sys.argv[1:]])
    print(f"\ncommand: {command}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
