"""Payments-grade steps: what a ``ctx.transaction`` step costs next to a plain step.

    .venv/bin/python -m bench.payments [--workflows 500] [--rounds 3]
    .venv/bin/python -m bench.payments --quick    # a smoke test

Three workloads of three steps each, on a private PostgreSQL with default
durability: ``three`` (plain trivial steps), ``three-plain-write`` (the middle
step inserts a row into the app's table on its own connection, as a plain
step would) and ``three-tx`` (the middle step inserts the same row with
``ctx.transaction``, its record in the same transaction).  Commits per run
are read from pg_stat_database; the claim is that ``three-tx`` costs no more
than ``three`` and one fewer than ``three-plain-write``.

Then the codec's cost: ``three`` served by an app with
``FlowKeeper(codec=AesGcmCodec([key]))`` (inputs, results and output sealed
with AES-256-GCM) against the same app without, interleaved; the claim is a
throughput cost of at most 15 %.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import asyncpg

from flowkeeper.codec import AesGcmCodec

from .apps.payments_workflows import ORDERS_SQL, PAYMENT_WORKFLOWS
from .apps.workflows import WORKFLOWS
from .common import durable_cluster, interpreter, median, served_app, table
from .core import run_batch

WORKLOADS = ("three", "three-plain-write", "three-tx")


async def main_async(args: argparse.Namespace) -> None:
    # run_batch triggers through WORKFLOWS: make the payment workflows known to it.
    WORKFLOWS.update(PAYMENT_WORKFLOWS)
    settle = 0.0 if args.quick else None
    with durable_cluster() as cluster:
        url = cluster.url
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(ORDERS_SQL)
        finally:
            await conn.close()
        with served_app(url, module="bench.apps.payments_app") as endpoint:
            await run_batch(url, endpoint, "three-tx", args.warmup, args.concurrency, settle=0)
            results: dict[str, list[dict[str, float]]] = {w: [] for w in WORKLOADS}
            for _ in range(args.rounds):  # interleaved, so drift hits every workload alike
                for workflow in WORKLOADS:
                    results[workflow].append(
                        await run_batch(
                            url, endpoint, workflow, args.workflows, args.concurrency, settle=settle
                        )
                    )
            # One at a time no two runs' writes share a transaction (group
            # commit): what each step's record itself costs.
            alone = {
                w: await run_batch(url, endpoint, w, args.alone, 1, settle=settle)
                for w in WORKLOADS
            }
            os.environ["BENCH_CODEC_KEY"] = AesGcmCodec.generate_key()
            try:
                with served_app(url, module="bench.apps.payments_app") as sealed:
                    os.environ.pop("BENCH_CODEC_KEY", None)
                    await run_batch(url, sealed, "three", args.warmup, args.concurrency, settle=0)
                    rates: dict[str, list[float]] = {"plain": [], "sealed": []}
                    pair = (("plain", endpoint), ("sealed", sealed))
                    for i in range(args.codec_rounds):
                        # ABBA order: neither app always runs first (the machine's load drifts).
                        for name, where in pair if i % 2 == 0 else pair[::-1]:
                            batch = await run_batch(
                                url, where, "three", args.workflows, args.concurrency, settle=0
                            )
                            rates[name].append(batch["per_second"])
            finally:
                os.environ.pop("BENCH_CODEC_KEY", None)
    rows = []
    figures: dict[str, tuple[float, float]] = {}
    for workflow in WORKLOADS:
        rate = median([r["per_second"] for r in results[workflow]])
        commits = median([r["commits_per_run"] for r in results[workflow]])
        figures[workflow] = (rate, commits)
        rows.append([f"{args.workflows} x {workflow}", f"{rate:.0f}", f"{commits:.2f}"])
    print()
    print(table(rows, ["workload", "workflows/s (median)", "commits/run"]))
    print()
    tx, plain, write = figures["three-tx"][1], figures["three"][1], figures["three-plain-write"][1]
    print(
        f"transaction step commits/run minus plain: {tx - plain:+.2f}; "
        f"minus plain step writing on its own connection: {tx - write:+.2f}"
    )
    one = {w: alone[w]["commits_per_run"] for w in WORKLOADS}
    print(
        f"one run at a time ({args.alone} each; no group commit sharing): commits/run "
        + ", ".join(f"{w} {one[w]:.2f}" for w in WORKLOADS)
        + f"; transaction minus plain {one['three-tx'] - one['three']:+.2f}"
    )
    fraction = figures["three-tx"][0] / figures["three"][0]
    print(f"transaction workflows/s as a fraction of plain: {fraction:.0%}")
    plain_rate, sealed_rate = median(rates["plain"]), median(rates["sealed"])
    print()
    print(
        table(
            [
                [f"{args.workflows} x three", f"{plain_rate:.0f}"],
                [f"{args.workflows} x three, AES-GCM codec", f"{sealed_rate:.0f}"],
            ],
            ["workload", "workflows/s (median)"],
        )
    )
    print(f"codec throughput cost on the 3-step workflow: {1 - sealed_rate / plain_rate:.1%}")
    command = " ".join([interpreter(), "-m", "bench.payments", *sys.argv[1:]])
    print(f"\ncommand: {command}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke test: small sizes")
    parser.add_argument("--workflows", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--codec-rounds", type=int, default=None)
    parser.add_argument("--alone", type=int, default=None, help="runs per workload one at a time")
    args = parser.parse_args()
    args.workflows = args.workflows or (40 if args.quick else 500)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.warmup = args.warmup or (10 if args.quick else 100)
    args.codec_rounds = args.codec_rounds or (1 if args.quick else 5)
    args.alone = args.alone or (10 if args.quick else 100)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
