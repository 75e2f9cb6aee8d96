"""procrastinate: a "workflow" of three chained jobs (job 1 defers job 2 defers job 3).

    python -m bench.peers procrastinate --database-url postgresql://.../bench_procrastinate

Configured as procrastinate's docs show: a ``PsycopgConnector`` app, async
tasks, jobs deferred with ``defer_async`` from the app process, and one
worker process run with ``concurrency=30`` (the docs' example for
asynchronous tasks).  A workflow is done when its third job has succeeded.
"""

from __future__ import annotations

import argparse

import asyncpg
from procrastinate import App, PsycopgConnector

from .harness import report, timed_batch, worker_process

WORKER_CONCURRENCY = 30


def make_app(database_url: str) -> App:
    app = App(
        connector=PsycopgConnector(
            conninfo=database_url, min_size=4, max_size=WORKER_CONCURRENCY // 2
        )
    )

    @app.task(name="step3")
    async def step3(n: int) -> int:
        return n + 1

    @app.task(name="step2")
    async def step2(n: int) -> None:
        await step3.defer_async(n=n + 1)

    @app.task(name="step1")
    async def step1(n: int) -> None:
        await step2.defer_async(n=n + 1)

    return app


async def run_worker(database_url: str) -> None:
    async with make_app(database_url).open_async() as app:
        print("ready", flush=True)
        await app.run_worker_async(concurrency=WORKER_CONCURRENCY, wait=True)


async def drive(args: argparse.Namespace) -> None:
    url: str = args.database_url
    setup = await asyncpg.connect(url)
    try:
        installed = await setup.fetchval("SELECT to_regclass('procrastinate_jobs')") is not None
        if installed:  # an earlier round's jobs: start from an empty queue
            await setup.execute("TRUNCATE procrastinate_jobs CASCADE")
    finally:
        await setup.close()
    async with make_app(url).open_async() as app:
        if not installed:
            await app.schema_manager.apply_schema_async()
        task = app.tasks["step1"]

        async def start(i: int) -> object:
            return await task.defer_async(n=i)

        async def finished(conn: asyncpg.Connection) -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) = 0 FROM procrastinate_jobs WHERE status <> 'succeeded'"
                )
            )

        result: dict[str, float] = {}
        with worker_process("procrastinate", url):
            for count in (args.warmup, args.workflows):
                if count:
                    result = await timed_batch(url, count, args.concurrency, start, finished)
        done = await app.connector.execute_query_one_async(
            "SELECT count(*) AS n FROM procrastinate_jobs "
            "WHERE task_name = 'step3' AND status = 'succeeded'"
        )
        expected = args.warmup + args.workflows
        assert done["n"] == expected, f"{done['n']} of {expected} workflows completed"
    report(result)
