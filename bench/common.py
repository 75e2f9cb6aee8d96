"""Shared pieces of the benchmarks: a durable cluster, a served app, stats."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import httpx

from flowkeeper.testing import PostgresCluster
from flowkeeper.testing.postgres import free_port

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-signing-key-0123456789abcdef"
STATS_IDLE_INTERVAL = 10.0


def _has_pg_stat_statements() -> bool:
    try:
        libdir = subprocess.run(
            ["pg_config", "--pkglibdir"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return (Path(libdir) / "pg_stat_statements.so").exists()


@contextmanager
def durable_cluster(**settings: str) -> Iterator[PostgresCluster]:
    """A private cluster with PostgreSQL's default durability (fsync, synchronous_commit on).

    pg_stat_statements is preloaded where installed, so round trips can be counted.
    """
    conf = {"max_connections": "300", **settings}
    preload = ["pg_stat_statements"] if _has_pg_stat_statements() else []
    cluster = PostgresCluster(durable=True, settings=conf, preload=preload)
    url = os.environ.get("BENCH_DATABASE_URL")
    if url:  # an existing server: only hand it through
        cluster._url = url
        yield cluster
        return
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


#: The process id of each endpoint served_app is serving (for memory figures).
SERVED_PIDS: dict[str, int] = {}


@contextmanager
def served_app(
    database_url: str, *, module: str = "bench.apps.bench_app", pool_size: int = 5
) -> Iterator[str]:
    """uvicorn (uvloop + httptools, as `pip install uvicorn[standard]` gives) in a subprocess."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/api/flowkeeper"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "FLOWKEEPER_SIGNING_KEY": KEY,
        "FLOWKEEPER_ENDPOINT": endpoint,
        "FLOWKEEPER_POOL_SIZE": str(pool_size),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            f"{module}:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--loop",
            "auto",
            "--http",
            "auto",
        ],
        env=env,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint + "/", timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("benchmark app did not start") from None
                time.sleep(0.05)
        SERVED_PIDS[endpoint] = proc.pid
        yield endpoint
    finally:
        SERVED_PIDS.pop(endpoint, None)
        proc.terminate()
        proc.wait(timeout=20)


def interpreter() -> str:
    """This interpreter, relative to the repository when it lives there (for printed commands)."""
    try:
        return str(Path(sys.executable).relative_to(ROOT))
    except ValueError:
        return sys.executable


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def sibling_url(url: str, database: str) -> str:
    """The URL of another database on the same server."""
    return url.rsplit("/", 1)[0] + f"/{database}"


class DatabaseStats:
    """Commits and statements of one database, read from another one.

    Reading from the ``postgres`` database keeps the readings themselves out
    of the measured database's counts.  A busy backend that goes idle reports
    its last commits to ``pg_stat_database`` only when PostgreSQL's idle
    statistics timeout fires (PGSTAT_IDLE_INTERVAL, 10 s in PostgreSQL 15),
    so :meth:`settled_commits` waits that long before it reads (``settle``;
    a smaller one makes a quick but low count).
    """

    def __init__(self, database_url: str, *, settle: float | None = None) -> None:
        self.settle = STATS_IDLE_INTERVAL + 0.5 if settle is None else settle
        self.database = database_url.rsplit("/", 1)[1].split("?", 1)[0]
        self.admin_url = sibling_url(database_url, "postgres")
        self._conn: asyncpg.Connection | None = None
        self.has_statements = False

    async def open(self) -> DatabaseStats:
        self._conn = await asyncpg.connect(self.admin_url)
        preloaded = await self._conn.fetchval("SHOW shared_preload_libraries")
        if "pg_stat_statements" in preloaded:
            await self._conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self.has_statements = True
        return self

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def commits(self) -> int:
        assert self._conn is not None
        return int(
            await self._conn.fetchval(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", self.database
            )
        )

    async def settled_commits(self) -> int:
        await asyncio.sleep(self.settle)
        return await self.commits()

    async def statements(self) -> int | None:
        """Statements executed so far (each one round trip), None without pg_stat_statements."""
        if not self.has_statements:
            return None
        assert self._conn is not None
        return int(
            await self._conn.fetchval(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1)",
                self.database,
            )
        )


async def quiesce(database_url: str, *, limit: float = 60.0) -> None:
    """Let the server settle before a measured round, the same for every system.

    A CHECKPOINT writes out what the previous round dirtied, and autovacuum
    workers cleaning up its tables are waited for (up to ``limit`` seconds),
    so no system's round pays for another's aftermath.
    """
    conn = await asyncpg.connect(sibling_url(database_url, "postgres"))
    try:
        await conn.execute("CHECKPOINT")
        give_up = time.monotonic() + limit
        while time.monotonic() < give_up:
            busy = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
            )
            if not busy:
                break
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


def bytecode_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for timing imports: bytecode written and used, as deployed.

    This machine sets PYTHONDONTWRITEBYTECODE=1, so a source checkout would be
    compiled from source on every import while installed packages (the
    peers, the dependencies) load their .pyc files: an unfair race.
    ``compile_sources()`` writes flowkeeper's bytecode once, as pip does for
    an installed package.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(extra or {})
    return env


def compile_sources() -> None:
    """Write .pyc files for flowkeeper, its adapters and the examples (pip does on install)."""
    import compileall

    for folder in ("flowkeeper", "adapters", "examples"):
        compileall.compile_dir(str(ROOT / folder), quiet=1)
