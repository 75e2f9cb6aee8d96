"""The database connector: a small pool of asyncpg connections, made lazily, pooler-aware.

Nothing here runs at import or construction time: connections are made on
first use, inside the event loop that uses them (serverless hosts may run each
invocation in a new loop; connections from another loop are dropped).

Behind a transaction pooler (PgBouncer in transaction mode, Supabase's
Supavisor on 6543, Neon's ``-pooler`` hosts) server-side prepared statements
cannot be reused, so asyncpg's statement cache is turned off.  The pooler is
recognised from the URL, or set explicitly with ``pooled=True``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import ConfigurationError, DatabaseError

if TYPE_CHECKING:
    import asyncpg

logger = logging.getLogger("flowkeeper")

# Query parameters flowkeeper understands and removes before asyncpg sees the URL.
_POOLED_PARAMS = ("pgbouncer", "flowkeeper_pooled")


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def parse_database_url(url: str) -> tuple[str, bool]:
    """Return the URL asyncpg should see and whether it points at a pooler."""
    if not url or not isinstance(url, str):
        raise ConfigurationError(
            "No database URL configured. Pass database_url=... or set DATABASE_URL "
            "(e.g. postgresql://user:password@host:5432/dbname)."
        )
    parts = urlsplit(url)
    if parts.scheme not in {"postgres", "postgresql"}:
        raise ConfigurationError(
            f"Database URL must start with postgresql:// (got scheme {parts.scheme!r})."
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    pooled = False
    kept = []
    for key, value in query:
        if key in _POOLED_PARAMS:
            pooled = pooled or _truthy(value)
        else:
            kept.append((key, value))
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"Database URL has an invalid port: {exc}") from None
    if "pooler." in host or "-pooler" in host or port == 6543:
        pooled = True
    clean = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(kept)))
    return clean, pooled


def describe(url: str) -> str:
    """host:port/db of a URL, without credentials, for messages."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"


class Database:
    """A small connection pool, made on first use, bound to the event loop using it.

    Why not ``asyncpg.Pool``: its acquire/release machinery (a shielded task
    and a reset coroutine per release) costs about 45 µs of CPU per query
    here, close to the cost of the query itself, and flowkeeper sends one
    query per acquire.  This pool is a stack of idle connections under a
    semaphore: at most ``max_size`` connections exist, the most recently used
    one is reused first, and connections idle for ``max_idle`` seconds are
    closed.  Nothing is reset between uses (asyncpg's pool sends ``RESET ALL;
    UNLISTEN *; ...``, a round trip): flowkeeper's queries leave no session
    state, and LISTEN uses a connection of its own.  A connection that may be
    in an unknown state (its query was cancelled or timed out, the socket
    failed, a transaction is open) is closed rather than reused.
    """

    def __init__(
        self,
        url: str,
        *,
        max_size: int = 5,
        pooled: bool | None = None,
        connect_timeout: float = 10.0,
        command_timeout: float | None = 60.0,
        max_idle: float = 60.0,
    ) -> None:
        clean, detected = parse_database_url(url)
        if max_size < 1:
            raise ConfigurationError("pool_size must be at least 1")
        self.url = clean
        self.pooled = detected if pooled is None else pooled
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.max_idle = max_idle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        #: Idle connections, most recently released last, with the loop time of release.
        self._idle: list[tuple[asyncpg.Connection, float]] = []
        #: Connections handed out by get() since the pool was (re)made.
        self._busy: set[asyncpg.Connection] = set()
        self._expiry: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def role(self) -> str | None:
        """The user name in the URL (for messages), if it has one."""
        return urlsplit(self.url).username

    def connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"timeout": self.connect_timeout}
        if self.command_timeout:
            kwargs["command_timeout"] = self.command_timeout
        if self.pooled:
            # Transaction poolers hand each statement to any server connection.
            kwargs["statement_cache_size"] = 0
        return kwargs

    async def connect(self) -> asyncpg.Connection:
        """A single connection outside the pool (LISTEN, migrations, CLI)."""
        import asyncpg

        try:
            return await asyncpg.connect(self.url, **self.connect_kwargs())
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: BaseException) -> DatabaseError:
        return DatabaseError(
            f"Cannot connect to Postgres at {describe(self.url)}: {type(exc).__name__}: {exc}. "
            "Check DATABASE_URL and that the server is running and reachable."
        )

    # the pool -------------------------------------------------------------------
    def _slots_for(self, loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
        if self._loop is not loop or self._slots is None:
            if self._idle:
                # Made in a loop that is gone: its connections cannot be used here.
                logger.debug(
                    "event loop changed; dropping %d pooled connection(s)", len(self._idle)
                )
                for conn, _ in self._idle:
                    with contextlib.suppress(Exception):  # best effort on a dead loop
                        conn.terminate()
            if self._expiry is not None:
                self._expiry.cancel()
            self._idle, self._busy, self._expiry = [], set(), None
            self._loop = loop
            self._slots = asyncio.Semaphore(self.max_size)
        return self._slots

    async def get(self) -> asyncpg.Connection:
        """Take a connection for one operation; give it back with :meth:`put`."""
        slots = self._slots_for(asyncio.get_running_loop())
        await slots.acquire()
        try:
            conn = None
            while self._idle and conn is None:
                conn, _ = self._idle.pop()
                if conn.is_closed():
                    conn = None
            if conn is None:
                conn = await self.connect()
            self._busy.add(conn)
            return conn
        except BaseException:
            slots.release()
            raise

    def put(self, conn: asyncpg.Connection, *, reusable: bool = True) -> None:
        """Give back a connection from :meth:`get`; close it unless it is known to be clean."""
        if conn not in self._busy or self._slots is None:  # the pool was closed or replaced
            self._discard(conn)
            return
        self._busy.discard(conn)
        loop = asyncio.get_running_loop()
        if reusable and not conn.is_closed() and not conn.is_in_transaction():
            self._idle.append((conn, loop.time()))
            if self._expiry is None:
                self._expiry = loop.call_later(self.max_idle, self._expire)
        else:
            self._discard(conn)
        self._slots.release()

    def _discard(self, conn: asyncpg.Connection) -> None:
        if not conn.is_closed():
            conn.terminate()

    def _expire(self) -> None:
        """Close connections idle for max_idle seconds (oldest first); look again later."""
        assert self._loop is not None
        self._expiry = None
        cutoff = self._loop.time() - self.max_idle
        while self._idle and self._idle[0][1] <= cutoff:
            conn, _ = self._idle.pop(0)
            self._close_soon(conn)
        if self._idle:
            wait = self._idle[0][1] + self.max_idle - self._loop.time()
            self._expiry = self._loop.call_later(max(0.1, wait), self._expire)

    def _close_soon(self, conn: asyncpg.Connection) -> None:
        task = asyncio.get_running_loop().create_task(self._close(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(conn: asyncpg.Connection) -> None:
        try:
            await conn.close(timeout=5)
        except Exception:
            conn.terminate()

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        """A pooled connection for several operations (migrations, schema checks)."""
        import asyncpg

        conn = await self.get()
        reusable = False
        try:
            yield conn
            reusable = True
        except asyncpg.PostgresError:
            reusable = True  # the server refused a statement; the session is intact
            raise
        finally:
            self.put(conn, reusable=reusable)

    async def close(self) -> None:
        """Close the idle connections; any in use are closed when given back."""
        idle, self._idle = self._idle, []
        if self._expiry is not None:
            self._expiry.cancel()
        same_loop = self._loop is asyncio.get_running_loop()
        self._loop, self._slots, self._expiry, self._busy = None, None, None, set()
        for conn, _ in idle:
            if same_loop:
                await self._close(conn)
            else:  # made in a loop that is gone
                with contextlib.suppress(Exception):
                    conn.terminate()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
