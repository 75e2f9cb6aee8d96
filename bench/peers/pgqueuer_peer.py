"""pgqueuer: a "workflow" of three chained jobs (job 1 enqueues job 2 enqueues job 3).

    python -m bench.peers pgqueuer --database-url postgresql://.../bench_pgqueuer

Configured as pgqueuer's README shows: a consumer ``PgQueuer(AsyncpgDriver(connection))``
with one entrypoint per job, run in its own worker process with the defaults
of ``pgq run`` (batch size 10), and a producer enqueuing with
``Queries(AsyncpgDriver(connection)).enqueue`` from the app process.  A
workflow is done when its third job has been acknowledged (removed from the
queue table).
"""

from __future__ import annotations

import argparse

import asyncpg
from pgqueuer import PgQueuer
from pgqueuer.db import AsyncpgDriver, AsyncpgPoolDriver
from pgqueuer.models import Job
from pgqueuer.queries import Queries

from .harness import report, timed_batch, worker_process


async def run_worker(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=10)
    assert pool is not None
    producer = Queries(AsyncpgPoolDriver(pool))
    pgq = PgQueuer(AsyncpgDriver(connection))

    @pgq.entrypoint("step1")
    async def step1(job: Job) -> None:
        assert job.payload is not None
        await producer.enqueue("step2", str(int(job.payload) + 1).encode())

    @pgq.entrypoint("step2")
    async def step2(job: Job) -> None:
        assert job.payload is not None
        await producer.enqueue("step3", str(int(job.payload) + 1).encode())

    @pgq.entrypoint("step3")
    async def step3(job: Job) -> None:
        assert job.payload is not None

    print("ready", flush=True)
    await pgq.run()


async def drive(args: argparse.Namespace) -> None:
    url: str = args.database_url
    connection = await asyncpg.connect(url)
    try:
        queries = Queries(AsyncpgDriver(connection))
        if not await queries.schema_is_installed():
            await queries.install()
        await connection.execute("TRUNCATE pgqueuer, pgqueuer_log")
    finally:
        await connection.close()
    pool = await asyncpg.create_pool(url, min_size=args.concurrency, max_size=args.concurrency)
    assert pool is not None
    producer = Queries(AsyncpgPoolDriver(pool))

    async def start(i: int) -> object:
        return await producer.enqueue("step1", str(i).encode())

    async def finished(conn: asyncpg.Connection) -> bool:
        return bool(await conn.fetchval("SELECT count(*) = 0 FROM pgqueuer"))

    try:
        with worker_process("pgqueuer", url):
            result: dict[str, float] = {}
            for count in (args.warmup, args.workflows):
                if count:
                    result = await timed_batch(url, count, args.concurrency, start, finished)
        failures = await pool.fetchval(
            "SELECT count(*) FROM pgqueuer_log "
            "WHERE status NOT IN ('queued', 'picked', 'successful')"
        )
        assert failures == 0, f"{failures} pgqueuer jobs did not succeed"
    finally:
        await pool.close()
    report(result)
