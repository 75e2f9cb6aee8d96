"""The pytest plugin shipped with flowkeeper (entry point ``pytest11``).

Fixtures:

``flowkeeper_runner``
    A :class:`~flowkeeper.testing.runner.WorkflowRunner` for the workflows of
    ``flowkeeper_app``, on a database of the test's own.
``flowkeeper_app``
    Your :class:`FlowKeeper` (the one your workflows are registered on).
    Override it in ``conftest.py``, or name it in the ini file:
    ``flowkeeper_app = shop.workflows:fk``.  Its own database is never used.
``flowkeeper_database_url``
    A fresh database with the flowkeeper schema, a copy of a template made
    once per session (``CREATE DATABASE ... TEMPLATE``, a few tens of ms).
``flowkeeper_server_url``
    The PostgreSQL server: ``FLOWKEEPER_TEST_DATABASE_URL`` (or the ini option
    ``flowkeeper_database_url``) when set, else a private server started from
    the machine's PostgreSQL binaries for the session.

With ``flowkeeper_app`` set in the ini file, the plugin also sets
``DATABASE_URL`` (the test server) and ``FLOWKEEPER_SIGNING_KEY`` (a test key)
when they are unset, before your modules are imported, so a module-level
``fk = FlowKeeper()`` can be imported by tests with no environment of their own.

The async fixtures need pytest-asyncio (``pip install 'flowkeeper[testing]'``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar, cast

import pytest

from ..errors import ConfigurationError

TEST_SIGNING_KEY = "flowkeeper-testing-signing-key-not-a-secret"

_counter = itertools.count()

_F = TypeVar("_F", bound=Callable[..., Any])

try:
    import pytest_asyncio

    _HAVE_ASYNCIO = True
except ImportError:  # pragma: no cover - exercised only without pytest-asyncio
    _HAVE_ASYNCIO = False


def _async_fixture(fn: _F) -> _F:
    return cast(_F, pytest_asyncio.fixture(fn))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "flowkeeper_app",
        "module:attribute of the FlowKeeper whose workflows flowkeeper_runner runs",
        default="",
    )
    parser.addini(
        "flowkeeper_database_url",
        "PostgreSQL server for flowkeeper's test databases (default: a private one)",
        default="",
    )


_PORT_KEY = pytest.StashKey[int]()


def _configured_url(config: pytest.Config) -> str:
    return os.environ.get("FLOWKEEPER_TEST_DATABASE_URL") or str(
        config.getini("flowkeeper_database_url") or ""
    )


def pytest_configure(config: pytest.Config) -> None:
    if not config.getini("flowkeeper_app"):
        return  # not a project that opted in: leave the environment alone
    url = _configured_url(config)
    if not url:
        # The private server starts with the first test that needs it, on this port.
        from .postgres import free_port

        port = config.stash[_PORT_KEY] = free_port()
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    if not (os.environ.get("DATABASE_URL") or os.environ.get("FLOWKEEPER_DATABASE_URL")):
        os.environ["DATABASE_URL"] = url
    os.environ.setdefault("FLOWKEEPER_SIGNING_KEY", TEST_SIGNING_KEY)


class _Server:
    """The session's server and its test databases (one per schema, emptied per test).

    Emptying the tables (``DELETE``, sequences restarted, the clock reset)
    costs a few milliseconds; copying a template database costs hundreds on a
    busy machine, so each test gets the same database back, empty.
    """

    #: Tables that are the schema's own bookkeeping, not data a test made.
    KEEP = frozenset({"migrations", "fake_clock"})

    def __init__(self, url: str) -> None:
        self.url = url
        self.databases: dict[str, tuple[str, str]] = {}  # schema -> (database, reset SQL)
        self.lock = asyncio.Lock()

    def dsn(self, database: str) -> str:
        return self.url.rsplit("/", 1)[0] + f"/{database}"

    async def database(self, schema: str) -> tuple[str, str]:
        """The database for ``schema`` (made and migrated on first use) and its reset SQL."""
        import asyncpg

        from ..migrations import migrate
        from .clock import FakeClock

        async with self.lock:
            if schema in self.databases:
                return self.databases[schema]
            name = f"fk_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
            admin = await asyncpg.connect(self.url)
            try:
                await admin.execute(f"CREATE DATABASE {name}")
            finally:
                await admin.close()
            conn = await asyncpg.connect(self.dsn(name))
            try:
                await migrate(conn, schema)
                await FakeClock(conn, schema).install()
                tables = await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY 1", schema
                )
                sequences = await conn.fetch(
                    "SELECT sequencename FROM pg_sequences WHERE schemaname = $1", schema
                )
            finally:
                await conn.close()
            statements = [
                f'DELETE FROM {schema}."{t["tablename"]}"'
                for t in tables
                if t["tablename"] not in self.KEEP
            ]
            statements += [
                f'ALTER SEQUENCE {schema}."{q["sequencename"]}" RESTART' for q in sequences
            ]
            statements.append(f"UPDATE {schema}.fake_clock SET shift = interval '0'")
            # Foreign keys between the tables: deferred checks let any order pass.
            reset = "BEGIN; SET CONSTRAINTS ALL DEFERRED; " + "; ".join(statements) + "; COMMIT"
            self.databases[schema] = (self.dsn(name), reset)
            return self.databases[schema]

    async def drop_databases(self) -> None:
        import asyncpg

        admin = await asyncpg.connect(self.url)
        try:
            for url, _ in self.databases.values():
                name = url.rsplit("/", 1)[1]
                await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


@pytest.fixture(scope="session")
def _flowkeeper_server(request: pytest.FixtureRequest) -> Iterator[_Server]:
    from .postgres import PostgresCluster

    url = _configured_url(request.config)
    cluster = None
    if not url:
        cluster = PostgresCluster(port=request.config.stash.get(_PORT_KEY, None))
        url = cluster.start()
    server = _Server(url)
    try:
        yield server
    finally:
        if server.databases:
            asyncio.run(server.drop_databases())
        if cluster is not None:
            cluster.stop()


@pytest.fixture(scope="session")
def flowkeeper_server_url(_flowkeeper_server: _Server) -> str:
    """The PostgreSQL server the test databases are made on."""
    return _flowkeeper_server.url


@pytest.fixture
def flowkeeper_app(request: pytest.FixtureRequest) -> Any:
    """Your FlowKeeper: override this fixture, or set ``flowkeeper_app`` in the ini file."""
    spec = str(request.config.getini("flowkeeper_app") or "")
    if not spec:
        raise ConfigurationError(
            "flowkeeper_runner needs your FlowKeeper: define a fixture in conftest.py "
            "(@pytest.fixture def flowkeeper_app(): return fk) or set flowkeeper_app = "
            "module:attribute in your pytest ini options."
        )
    from ..cli.common import load_app

    return load_app(spec)


def _require_asyncio() -> None:
    if not _HAVE_ASYNCIO:
        raise ConfigurationError(
            "flowkeeper's test fixtures are async and need pytest-asyncio: "
            "pip install 'flowkeeper[testing]' (or pytest-asyncio)."
        )


if _HAVE_ASYNCIO:

    @_async_fixture
    async def flowkeeper_database_url(
        _flowkeeper_server: _Server, flowkeeper_app: Any = None
    ) -> AsyncIterator[str]:
        """A database holding the flowkeeper schema, with every table empty."""
        async for url in _database(_flowkeeper_server, getattr(flowkeeper_app, "schema", None)):
            yield url

    @_async_fixture
    async def flowkeeper_runner(flowkeeper_app: Any, _flowkeeper_server: _Server) -> Any:
        """A WorkflowRunner for ``flowkeeper_app``'s workflows on a fresh database."""
        async for runner in _runner(flowkeeper_app, _flowkeeper_server):
            yield runner

else:  # pragma: no cover

    @pytest.fixture
    def flowkeeper_database_url() -> str:
        _require_asyncio()
        raise AssertionError

    @pytest.fixture
    def flowkeeper_runner() -> Any:
        _require_asyncio()
        raise AssertionError


async def _database(server: _Server, schema: str | None) -> AsyncIterator[str]:
    import asyncpg

    url, reset = await server.database(schema or "flowkeeper")
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(reset)
    finally:
        await conn.close()
    yield url


async def _runner(app: Any, server: _Server) -> AsyncIterator[Any]:
    import asyncpg

    from ..client import FlowKeeper
    from .clock import FakeClock
    from .runner import WorkflowRunner

    if not isinstance(app, FlowKeeper):
        raise ConfigurationError(f"flowkeeper_app must return a FlowKeeper, got {app!r}")
    async for url in _database(server, app.schema):
        fk = FlowKeeper(
            url,
            signing_key=TEST_SIGNING_KEY,
            endpoint="",  # never pushed: the runner executes every invocation itself
            schema=app.schema,
            time_budget=app.time_budget,
            lease=app.lease,
            default_retry=app.engine.default_retry,
            pool_size=2,
            auto_migrate=False,
        )
        for wf in app.registry:
            fk.register(wf)
        conn = await asyncpg.connect(url)
        try:
            yield WorkflowRunner(fk, FakeClock(conn, app.schema))
        finally:
            await conn.close()
            await fk.aclose()
