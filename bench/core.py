"""flowkeeper's own figures: throughput, commits and invocations per workflow, import time.

    .venv/bin/python -m bench.core [--workflows 1000] [--rounds 3]

Runs on a private PostgreSQL with default durability (fsync and
synchronous_commit on); the endpoint is served by uvicorn in a subprocess on
127.0.0.1 and runs are pushed by trigger (no scheduler involved).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import asyncpg

from flowkeeper import FlowKeeper

from .apps.workflows import WORKFLOWS
from .common import (
    KEY,
    ROOT,
    DatabaseStats,
    bytecode_env,
    compile_sources,
    durable_cluster,
    interpreter,
    median,
    served_app,
    table,
)


async def run_batch(
    database_url: str,
    endpoint: str,
    workflow: str,
    count: int,
    concurrency: int,
    *,
    settle: float | None = None,
) -> dict[str, float]:
    """Trigger ``count`` runs, wait until all completed; return timings and costs.

    ``statements_per_run`` (each statement one round trip to Postgres) is
    present when the cluster preloads pg_stat_statements.  ``settle``: see
    :class:`DatabaseStats`.
    """
    fk = FlowKeeper(database_url, KEY, endpoint, pool_size=10)
    fk.register(WORKFLOWS[workflow])
    watcher = await asyncpg.connect(database_url)
    stats = await DatabaseStats(database_url, settle=settle).open()
    try:
        await fk.migrate()
        await watcher.execute("TRUNCATE flowkeeper.runs CASCADE")
        commits_before = await stats.settled_commits()
        statements_before = await stats.statements()
        polls = 0
        semaphore = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with semaphore:
                await fk.trigger(workflow, i)

        async def scheduler() -> None:
            # Only workloads with sleeps need one; pushes drive the rest.
            while True:
                await fk.tick()
                await asyncio.sleep(0.05)

        started = time.perf_counter()
        triggering = asyncio.gather(*(one(i) for i in range(count)))
        ticking = asyncio.create_task(scheduler()) if "sleep" in workflow else None
        while True:
            await asyncio.sleep(0.02)
            polls += 1
            done = await watcher.fetchval(
                "SELECT count(*) FROM flowkeeper.runs WHERE status = 'completed'"
            )
            if done >= count and triggering.done():
                break
        elapsed = time.perf_counter() - started
        await triggering
        if ticking is not None:
            ticking.cancel()
        statements_after = await stats.statements()
        # The watcher's polls are transactions of this database too.
        commits = await stats.settled_commits() - commits_before - polls
        invocations = await watcher.fetchval("SELECT sum(invocations) FROM flowkeeper.runs")
        failed = await watcher.fetchval(
            "SELECT count(*) FROM flowkeeper.runs WHERE status <> 'completed'"
        )
        assert failed == 0, f"{failed} runs did not complete"
        result = {
            "elapsed": elapsed,
            "per_second": count / elapsed,
            "commits_per_run": commits / count,
            "invocations_per_run": invocations / count,
        }
        if statements_before is not None and statements_after is not None:
            result["statements_per_run"] = (statements_after - statements_before - polls) / count
        return result
    finally:
        await stats.close()
        await watcher.close()
        await fk.aclose()


def import_times(rounds: int) -> tuple[float, float]:
    """Median wall time of `import flowkeeper` vs importing its dependencies, fresh processes."""

    compile_sources()

    def measure(code: str) -> float:
        samples = []
        for _ in range(rounds):
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"import time; t=time.perf_counter(); {code}; print(time.perf_counter()-t)",
                ],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
                env=bytecode_env(),
            )
            samples.append(float(out.stdout))
        return median(samples)

    deps = "import starlette.applications, asyncpg, pydantic, httpx, itsdangerous"
    own = "import flowkeeper"
    return measure(own), measure(deps)


async def main_async(args: argparse.Namespace) -> None:
    with durable_cluster() as cluster:
        url = cluster.url
        with served_app(url) as endpoint:
            await run_batch(url, endpoint, "three", 100, args.concurrency)  # warm up
            rows = []
            for workflow, count in (
                ("three", args.workflows),
                ("five", 200),
                ("five-with-sleep", 200),
            ):
                results = [
                    await run_batch(url, endpoint, workflow, count, args.concurrency)
                    for _ in range(args.rounds if workflow == "three" else 1)
                ]
                rows.append(
                    [
                        f"{count} x {workflow}",
                        f"{median([r['per_second'] for r in results]):.0f}",
                        f"{median([r['commits_per_run'] for r in results]):.2f}",
                        f"{median([r['invocations_per_run'] for r in results]):.2f}",
                    ]
                )
    own, deps = import_times(args.rounds * 3)
    print()
    print(table(rows, ["workload", "workflows/s (median)", "commits/run", "HTTP invocations/run"]))
    print()
    print(
        f"import flowkeeper: {own * 1000:.0f} ms; its dependencies: {deps * 1000:.0f} ms; "
        f"ratio {own / deps:.2f}"
    )
    command = " ".join([interpreter(), "-m", "bench.core", *sys.argv[1:]])
    print(f"\ncommand: {command}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workflows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
