"""Shared pieces of the benchmarks: a durable cluster, a served app, stats."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from flowkeeper.testing import PostgresCluster
from flowkeeper.testing.postgres import free_port

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-signing-key-0123456789abcdef"


@contextmanager
def durable_cluster(**settings: str) -> Iterator[PostgresCluster]:
    """A private cluster with PostgreSQL's default durability (fsync, synchronous_commit on)."""
    conf = {"max_connections": "300", **settings}
    cluster = PostgresCluster(durable=True, settings=conf)
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
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
