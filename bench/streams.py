"""A run's stream: what ctx.publish costs, and how soon a reader sees a message.

    .venv/bin/python -m bench.streams [--messages 2000] [--paced 200] [--rounds 3]

On a private PostgreSQL with default durability.  *Publish cost*: a step
publishes ``--messages`` messages as fast as it can (they are written in
batches); the figure is wall time per message, and per message when each is
followed by a pause long enough that every one is its own write.  *Latency*:
a step publishes ``--paced`` messages 10 ms apart while ``fk.stream`` reads the
run live in the same process; each message carries its publish time, so the
reader measures publish-to-receipt.  Once with LISTEN/NOTIFY (a direct
connection) and once by polling (as behind a transaction pooler, every
250 ms).  Rounds are interleaved; medians and ranges are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from flowkeeper import Context, FlowKeeper

from .common import KEY, durable_cluster, interpreter, median, table


def make(url: str, *, pooled: bool = False) -> FlowKeeper:
    fk = FlowKeeper(url, signing_key=KEY, pooled=pooled)

    async def burst(ctx: Context, n: int) -> int:
        for i in range(n):
            await ctx.publish("n", i)
        return n

    async def spaced(ctx: Context, n: int, pause: float) -> int:
        for _ in range(n):
            await ctx.publish("t", {"at": time.perf_counter()})
            await asyncio.sleep(pause)
        return n

    @fk.workflow("burst")
    async def burst_wf(ctx: Context, n: int) -> int:
        return await ctx.step("burst", burst, ctx, n)

    @fk.workflow("spaced")
    async def spaced_wf(ctx: Context, spec: dict[str, Any]) -> int:
        return await ctx.step("spaced", spaced, ctx, spec["n"], spec["pause"])

    return fk


async def publish_cost(fk: FlowKeeper, n: int) -> float:
    handle = await fk.trigger("burst", n)
    started = time.perf_counter()
    await fk.advance(handle.run_id)
    return (time.perf_counter() - started) / n


async def one_write_each(fk: FlowKeeper, n: int) -> float:
    handle = await fk.trigger("spaced", {"n": n, "pause": 0.02})
    started = time.perf_counter()
    await fk.advance(handle.run_id)
    return (time.perf_counter() - started) / n - 0.02


async def latencies(writer: FlowKeeper, reader: FlowKeeper, n: int) -> list[float]:
    handle = await writer.trigger("spaced", {"n": n, "pause": 0.01})
    seen: list[float] = []

    async def read() -> None:
        async for message in reader.stream(handle.run_id):
            seen.append(time.perf_counter() - float(message.data["at"]))

    task = asyncio.create_task(read())
    await asyncio.sleep(0.05)
    await writer.advance(handle.run_id)
    await asyncio.wait_for(task, 60)
    return seen


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main_async(args: argparse.Namespace) -> None:
    with durable_cluster() as cluster:
        url = cluster.url
        fk = make(url)
        polling = make(url, pooled=True)
        await publish_cost(fk, 100)  # warm up
        cost: list[float] = []
        single: list[float] = []
        listen: list[list[float]] = []
        poll: list[list[float]] = []
        for _ in range(args.rounds):
            cost.append(await publish_cost(fk, args.messages))
            single.append(await one_write_each(fk, 50))
            listen.append(await latencies(fk, fk, args.paced))
            poll.append(await latencies(fk, polling, args.paced))
        await fk.aclose()
        await polling.aclose()

    def ms(v: float) -> str:
        return f"{v * 1000:.2f}"

    def rng(vs: list[float]) -> str:
        return f"{ms(min(vs))} to {ms(max(vs))}"

    rows = [
        ["publish, batched (per message)", ms(median(cost)), rng(cost)],
        ["publish, one write each (per message)", ms(median(single)), rng(single)],
    ]
    for name, runs in (("LISTEN/NOTIFY", listen), ("polling (250 ms)", poll)):
        p50 = [pct(r, 0.5) for r in runs]
        p99 = [pct(r, 0.99) for r in runs]
        rows.append([f"publish → reader, {name}, p50", ms(median(p50)), rng(p50)])
        rows.append([f"publish → reader, {name}, p99", ms(median(p99)), rng(p99)])
    print()
    print(table(rows, ["figure", "ms (median of rounds)", "rounds"]))
    command = " ".join([interpreter(), "-m", "bench.streams", *sys.argv[1:]])
    print(f"\ncommand: {command}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--paced", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
