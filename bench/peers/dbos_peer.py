"""DBOS Transact: a workflow of three steps, started and awaited in the app's own process.

    python -m bench.peers dbos --database-url postgresql://.../bench_dbos

Configured as DBOS's docs show: ``DBOS(config={"name", "system_database_url"})``,
``DBOS.launch()``, async ``@DBOS.workflow()`` / ``@DBOS.step()`` functions
started with ``DBOS.start_workflow_async`` (DBOS runs workflows in the
process that starts them; its system database is the one given).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from dbos import DBOS, DBOSConfig

from .harness import report, timed_batch


def build(database_url: str) -> Any:
    config: DBOSConfig = {
        "name": "bench",
        "system_database_url": database_url,
        "log_level": "WARNING",
    }
    DBOS(config=config)

    @DBOS.step()
    async def noop(i: int) -> int:
        return i + 1

    @DBOS.workflow()
    async def three(n: int) -> int:
        n = await noop(n)
        n = await noop(n)
        return await noop(n)

    DBOS.launch()
    return three


async def drive(args: argparse.Namespace) -> None:
    three = build(args.database_url)

    async def start(i: int) -> Any:
        return await DBOS.start_workflow_async(three, i)

    async def wait_all(handles: list[Any]) -> None:
        results = await asyncio.gather(*(h.get_result() for h in handles))
        assert results == [i + 3 for i in range(len(handles))], "DBOS returned wrong results"

    try:
        if args.warmup:
            await timed_batch(
                args.database_url, args.warmup, args.concurrency, start, wait_all=wait_all
            )
        report(
            await timed_batch(
                args.database_url, args.workflows, args.concurrency, start, wait_all=wait_all
            )
        )
    finally:
        DBOS.destroy()
