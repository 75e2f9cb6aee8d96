from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest


@dataclass
class ConnectionSampler:
    """Polls pg_stat_activity for the backends connected to one database."""

    peak: int = 0
    last: int = 0
    samples: int = 0

    async def fresh(self) -> int:
        """The count from a sample taken entirely after this call."""
        start = self.samples
        while self.samples < start + 2:
            await asyncio.sleep(0.005)
        return self.last

    async def current(self, conn: asyncpg.Connection) -> int:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            )
        )


@pytest.fixture
async def connections(database_url: str) -> AsyncIterator[ConnectionSampler]:
    """Samples every 5 ms, for the whole test, how many clients the test database has."""
    sampler = ConnectionSampler()
    conn = await asyncpg.connect(database_url)
    stop = asyncio.Event()

    async def poll() -> None:
        while not stop.is_set():
            sampler.last = await sampler.current(conn)
            sampler.peak = max(sampler.peak, sampler.last)
            sampler.samples += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(poll())
    try:
        yield sampler
    finally:
        stop.set()
        await task
        await conn.close()
