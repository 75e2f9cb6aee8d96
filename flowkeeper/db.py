"""The database connector: a small asyncpg pool, created lazily, pooler-aware.

Nothing here runs at import or construction time: the pool is made on first
use, inside the event loop that uses it (serverless hosts may run each
invocation in a new loop; a pool from another loop is dropped and replaced).

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


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: flowkeeper leaves no session state behind.

    asyncpg's default reset runs ``RESET ALL; UNLISTEN *; ...`` on every
    release: one more round trip and one more commit per query.  flowkeeper's
    queries set no session state (locks are transaction-scoped, LISTEN uses its
    own connection); an open transaction is still rolled back by asyncpg.
    """


def describe(url: str) -> str:
    """host:port/db of a URL, without credentials, for messages."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"


class Database:
    """An asyncpg pool per event loop, made on first use."""

    def __init__(
        self,
        url: str,
        *,
        max_size: int = 5,
        pooled: bool | None = None,
        connect_timeout: float = 10.0,
        command_timeout: float | None = 60.0,
    ) -> None:
        clean, detected = parse_database_url(url)
        if max_size < 1:
            raise ConfigurationError("pool_size must be at least 1")
        self.url = clean
        self.pooled = detected if pooled is None else pooled
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None

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

    async def pool(self) -> asyncpg.Pool:
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._loop is loop:
            return self._pool
        if self._lock is None or self._loop is not loop:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._pool is not None and self._loop is loop:
                return self._pool
            if self._pool is not None:
                # Made in a loop that is gone: its connections cannot be used here.
                logger.debug("event loop changed; replacing the connection pool")
                with contextlib.suppress(Exception):  # best effort on a dead loop
                    self._pool.terminate()
            import asyncpg

            try:
                pool = await asyncpg.create_pool(
                    self.url,
                    min_size=0,
                    max_size=self.max_size,
                    max_inactive_connection_lifetime=60.0,
                    reset=_keep_session,
                    **self.connect_kwargs(),
                )
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                raise self._unreachable(exc) from exc
            self._pool, self._loop = pool, loop
            return pool

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        import asyncpg

        pool = await self.pool()
        try:
            conn = await pool.acquire()
        except (TimeoutError, OSError, asyncpg.PostgresConnectionError) as exc:
            raise self._unreachable(exc) from exc
        try:
            yield conn
        finally:
            await pool.release(conn)

    async def close(self) -> None:
        pool, self._pool, self._loop = self._pool, None, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except (TimeoutError, RuntimeError):
                pool.terminate()
