"""What observability costs: throughput with OpenTelemetry absent, idle, and tracing.

    .venv/bin/python -m bench.observability [--runs 300] [--steps 5] [--rounds 3] [--quick]

On a private PostgreSQL with default durability; ``--async-commit`` sets
``synchronous_commit=off``: without a disk flush per commit the Python side
weighs most, the worst case for the relative cost of observers.
Each round executes
``--runs`` runs of a ``--steps``-step workflow (trivial async steps) through
``fk.advance`` (no HTTP: the engine and its observers only), 8 at a time, in
each configuration, interleaved:

- *absent*: as when the ``otel`` extra is not installed (flowkeeper's lookup
  of OpenTelemetry answers "not installed", so no tracing or metrics observer
  exists; step logs stay on, as by default);
- *idle*: OpenTelemetry installed, no provider configured;
- *tracing*: a TracerProvider with a BatchSpanProcessor and an exporter that
  drops the spans (a span per invocation and per step attempt are made);
- *tracing+metrics*: the same, and a MeterProvider with an in-memory reader.

Prints runs/s (median of rounds, and the range), the CPU time this process
spent per run (``time.process_time``: engine, observers, exporter threads),
and each one's cost relative to *absent* in both.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

from flowkeeper import Context, FlowKeeper
from flowkeeper import metrics as metrics_module
from flowkeeper import tracing as tracing_module

from .common import KEY, durable_cluster, interpreter, median, table

CONCURRENCY = 8


def _dropping_provider() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    return provider


def _meter_provider() -> Any:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    return MeterProvider(metric_readers=[InMemoryMetricReader()])


def make(url: str, variant: str, steps: int) -> FlowKeeper:
    saved = (tracing_module._otel, metrics_module._api)
    try:
        if variant == "absent":
            tracing_module._otel = lambda: None  # type: ignore[assignment]
            metrics_module._api = lambda: None  # type: ignore[assignment]
        options: dict[str, Any] = {}
        if variant.startswith("tracing"):
            options["tracing"] = _dropping_provider()
            options["metrics"] = _meter_provider() if variant == "tracing+metrics" else False
        fk = FlowKeeper(url, signing_key=KEY, pool_size=CONCURRENCY + 2, **options)
    finally:
        tracing_module._otel, metrics_module._api = saved

    async def work(i: int) -> int:
        return i

    @fk.workflow("bench")
    async def wf(ctx: Context, n: int) -> int:
        total = 0
        for i in range(n):
            total += await ctx.step("work", work, i)
        return total

    assert (fk.tracer is None) == (variant == "absent")
    if variant == "idle":
        assert fk.tracer is not None
        assert fk.tracer._tracer() is None
    return fk


async def throughput(fk: FlowKeeper, runs: int, steps: int) -> tuple[float, float]:
    """Runs/s and CPU seconds per run."""
    ids = [(await fk.trigger("bench", steps)).run_id for _ in range(runs)]
    queue = list(ids)
    started = time.perf_counter()
    cpu = time.process_time()

    async def worker() -> None:
        while queue:
            result = await fk.advance(queue.pop())
            assert getattr(result, "outcome", None) == "completed", result

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return runs / (time.perf_counter() - started), (time.process_time() - cpu) / runs


VARIANTS = ("absent", "idle", "tracing", "tracing+metrics")


async def main_async(args: argparse.Namespace) -> None:
    settings = {"synchronous_commit": "off"} if args.async_commit else {}
    with durable_cluster(**settings) as cluster:
        fks = {v: make(cluster.url, v, args.steps) for v in VARIANTS}
        for fk in fks.values():  # warm up (pools, schema check, code paths)
            await throughput(fk, 10, args.steps)
        figures: dict[str, list[float]] = {v: [] for v in VARIANTS}
        cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            # A different order each round: later batches meet a bigger table.
            for v in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:
                rate, used = await throughput(fks[v], args.runs, args.steps)
                figures[v].append(rate)
                cpu[v].append(used)
        for fk in fks.values():
            await fk.aclose()
    base = median(figures["absent"])
    base_cpu = median(cpu["absent"])
    rows = []
    for v in VARIANTS:
        m = median(figures[v])
        c = median(cpu[v])
        rows.append(
            [
                v,
                f"{m:.0f}",
                f"{min(figures[v]):.0f}-{max(figures[v]):.0f}",
                f"{(base - m) / base * 100:+.1f}%",
                f"{c * 1000:.2f}",
                f"{(c - base_cpu) / base_cpu * 100:+.1f}%",
            ]
        )
    print()
    commit = "synchronous_commit=off" if args.async_commit else "default durability"
    print(
        f"{args.runs} runs x {args.steps} steps, {CONCURRENCY} at a time, "
        f"{args.rounds} rounds, {commit}"
    )
    headers = ["variant", "runs/s", "range", "throughput cost", "CPU ms/run", "CPU cost"]
    print(table(rows, headers))
    command = " ".join([interpreter(), "-m", "bench.observability", *sys.argv[1:]])
    print(f"\ncommand: {command}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a tiny run (smoke test)")
    parser.add_argument(
        "--async-commit", action="store_true", help="synchronous_commit=off (worst case)"
    )
    args = parser.parse_args()
    if args.quick:
        args.runs, args.rounds = 20, 1
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
