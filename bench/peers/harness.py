"""What every peer shares: the timed loop, commit counting, a worker subprocess.

A peer's figures come from its own database on the shared cluster:
``pg_stat_database.xact_commit`` before and after (read from another
database), less the commits of this harness's own polling queries.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg

from ..common import DatabaseStats

ROOT = Path(__file__).resolve().parents[2]
POLL_INTERVAL = 0.02


async def timed_batch(
    database_url: str,
    count: int,
    concurrency: int,
    start: Callable[[int], Awaitable[object]],
    finished: Callable[[asyncpg.Connection], Awaitable[bool]] | None = None,
    wait_all: Callable[[list[object]], Awaitable[object]] | None = None,
) -> dict[str, float]:
    """Start ``count`` workflows (``concurrency`` starts at a time), wait until all finished.

    Completion is seen either by polling ``finished`` on a watcher connection
    (job queues whose worker runs in another process) or by awaiting
    ``wait_all`` on what ``start`` returned (in-process workflow engines).
    """
    watcher = await asyncpg.connect(database_url)
    stats = await DatabaseStats(database_url).open()
    try:
        before = await stats.settled_commits()
        semaphore = asyncio.Semaphore(concurrency)
        polls = 0

        async def one(i: int) -> object:
            async with semaphore:
                return await start(i)

        started = time.perf_counter()
        starting = asyncio.gather(*(one(i) for i in range(count)))
        if wait_all is not None:
            await wait_all(await starting)
        else:
            assert finished is not None
            while True:
                await asyncio.sleep(POLL_INTERVAL)
                polls += 1
                if starting.done() and await finished(watcher):
                    break
            await starting
        elapsed = time.perf_counter() - started
        # The watcher's polls are transactions of this database too.
        spent = await stats.settled_commits() - before - polls
        return {
            "elapsed": elapsed,
            "per_second": count / elapsed,
            "commits_per_workflow": spent / count,
        }
    finally:
        await stats.close()
        await watcher.close()


@contextmanager
def worker_process(peer: str, database_url: str) -> Iterator[None]:
    """Run ``python -m bench.peers <peer> worker`` until the block ends (after its 'ready')."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.peers", peer, "worker", "--database-url", database_url],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{peer} worker did not start (exit code {proc.wait()})")
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def report(result: dict[str, float]) -> None:
    print(json.dumps(result), flush=True)
