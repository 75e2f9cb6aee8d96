"""Shared test helpers: FlowKeeper factories, a real uvicorn server, waiting loops."""

from __future__ import annotations

import asyncio
import bisect
import math
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import uvicorn

from flowkeeper import FlowKeeper
from flowkeeper.testing import PostgresCluster
from flowkeeper.testing.postgres import free_port

TEMPLATE_DB = "fk_template"
KEY = "test-signing-key-0123456789abcdef"


@dataclass
class ClusterInfo:
    url: str
    cluster: PostgresCluster | None

    def dsn(self, database: str) -> str:
        return self.url.rsplit("/", 1)[0] + f"/{database}"


def pg_cron_available() -> bool:
    try:
        out = subprocess.run(
            ["pg_config", "--pkglibdir"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return (Path(out) / "pg_cron.so").exists()


def make_fk(database_url: str, *, port: int | None = None, **kwargs: Any) -> FlowKeeper:
    """A FlowKeeper whose endpoint is http://127.0.0.1:<free port>/api/flowkeeper."""
    port = port or free_port()
    kwargs.setdefault("signing_key", KEY)
    kwargs.setdefault("endpoint", f"http://127.0.0.1:{port}/api/flowkeeper")
    fk = FlowKeeper(database_url, **kwargs)
    fk.test_port = port  # type: ignore[attr-defined]
    return fk


class Served:
    """``async with Served(app, port):`` runs a real uvicorn on 127.0.0.1:port."""

    def __init__(self, app: Any, port: int) -> None:
        self.port = port
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                log_level="warning",
                lifespan="off",
                access_log=False,
            )
        )
        self.task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Served:
        self.task = asyncio.create_task(self.server.serve())
        deadline = time.monotonic() + 10
        while not self.server.started:
            if self.task.done():
                self.task.result()
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.wait_for(self.task, timeout=30)


def serve(fk: FlowKeeper, app: Any = None) -> Served:
    """Serve ``fk.asgi()`` (mounted at /api/flowkeeper by its own prefix handling)."""
    return Served(app if app is not None else fk.asgi(), fk.test_port)  # type: ignore[attr-defined]


def busiest_window(times: Iterable[float], seconds: float = 1.0) -> int:
    """The most of ``times`` that fall in any window of ``seconds`` (rate-limit tests)."""
    ordered = sorted(times)
    return max(
        (bisect.bisect_left(ordered, t + seconds, i) - i for i, t in enumerate(ordered)),
        default=0,
    )


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], *, timeout: float = 20, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def drive(
    fk: FlowKeeper, run_ids: Iterable[str], *, timeout: float = 30, interval: float = 0.1
) -> dict[str, str]:
    """Tick until every run has finished; return run id -> final status."""
    ids = list(run_ids)
    deadline = time.monotonic() + timeout
    while True:
        statuses = {rid: (await fk.get_run(rid)).status.value for rid in ids}
        if all(s in ("completed", "failed", "cancelled") for s in statuses.values()):
            return statuses
        if time.monotonic() > deadline:
            raise AssertionError(f"runs not finished within {timeout}s: {statuses}")
        await fk.tick()
        await asyncio.sleep(interval)


def shape(value: Any) -> Any:
    """A comparable picture of a value that keeps what == forgets: types and order."""
    if isinstance(value, dict):
        return ("dict", [(shape(k), shape(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return (type(value).__name__, [shape(v) for v in value])
    if isinstance(value, float):
        return ("float", math.copysign(1.0, value), repr(value))
    if isinstance(value, pydantic.BaseModel):
        return (type(value).__qualname__, shape(value.model_dump()))
    return (type(value).__name__, value)
