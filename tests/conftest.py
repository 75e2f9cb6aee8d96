"""Real-Postgres fixtures: one private cluster per session, one database per test.

The cluster comes from the system's PostgreSQL binaries (flowkeeper.testing),
or from FLOWKEEPER_TEST_DATABASE_URL when set.  Migrations run once into a
template database; each test gets a fresh copy of it (CREATE DATABASE ...
TEMPLATE, ~30 ms).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from flowkeeper.testing import PostgresCluster
from flowkeeper.testing.postgres import find_bindir

from .helpers import TEMPLATE_DB, ClusterInfo, pg_cron_available

_counter = itertools.count()


def _admin_url(base: str) -> str:
    return base


@pytest.fixture(scope="session")
def pg() -> Iterator[ClusterInfo]:
    external = os.environ.get("FLOWKEEPER_TEST_DATABASE_URL")
    cluster: PostgresCluster | None = None
    if external:
        url = external
    else:
        if find_bindir() is None:
            pytest.exit(
                "No PostgreSQL server binaries found: install postgresql (apt-get install "
                "postgresql) or set FLOWKEEPER_TEST_DATABASE_URL.",
                returncode=3,
            )
        preload = ["pg_cron"] if pg_cron_available() else []
        settings = {"cron.database_name": "'postgres'"} if preload else {}
        cluster = PostgresCluster(preload=preload, settings=settings)
        url = cluster.start()

    async def make_template() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
            await conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
        finally:
            await conn.close()
        conn = await asyncpg.connect(url.rsplit("/", 1)[0] + f"/{TEMPLATE_DB}")
        try:
            from flowkeeper.migrations import migrate

            await migrate(conn, "flowkeeper")
        finally:
            await conn.close()

    asyncio.run(make_template())
    try:
        yield ClusterInfo(url=url, cluster=cluster)
    finally:
        if cluster is not None:
            cluster.stop()


@pytest.fixture
async def database_url(pg: ClusterInfo) -> AsyncIterator[str]:
    """A fresh database with the flowkeeper schema (version latest) in place."""
    name = f"t_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(pg.url)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB} STRATEGY FILE_COPY")
    finally:
        await admin.close()
    yield pg.dsn(name)
    admin = await asyncpg.connect(pg.url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def empty_database_url(pg: ClusterInfo) -> AsyncIterator[str]:
    """A fresh database without any flowkeeper schema."""
    name = f"e_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(pg.url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    yield pg.dsn(name)
    admin = await asyncpg.connect(pg.url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(database_url)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def artifacts_dir() -> Path:
    path = Path(__file__).resolve().parent.parent / "artifacts"
    path.mkdir(exist_ok=True)
    return path
