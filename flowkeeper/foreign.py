"""Triggering inside transactions of other database libraries.

``fk.trigger(..., connection=conn)`` inserts the run in the caller's own
transaction.  Besides an asyncpg connection, ``conn`` may be:

- a SQLAlchemy ``AsyncConnection`` or ``AsyncSession`` on the asyncpg driver
  (its asyncpg connection is used, inside SQLAlchemy's transaction);
- a psycopg 3 ``AsyncConnection`` (or SQLAlchemy on psycopg's async driver);
- for sync code (``fk.sync.trigger``): a psycopg 3 ``Connection`` or Django's
  ``django.db.connection``, typically inside ``transaction.atomic()``.

The statements are the store's own named queries (``insert_run``,
``run_by_id_or_key``), rewritten from asyncpg's ``$n`` to the DB-API's ``%s``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from .errors import ConfigurationError, DatabaseError

_PARAM = re.compile(r"\$(\d+)")
_COMMENT = re.compile(r"--[^\n]*")


def dbapi_query(sql: str, args: Sequence[Any]) -> tuple[str, list[Any]]:
    """asyncpg's ``$1 ... $n`` query as a DB-API ``%s`` query with its arguments in order."""
    ordered: list[Any] = []

    def swap(m: re.Match[str]) -> str:
        ordered.append(args[int(m.group(1)) - 1])
        return "%s"

    # Comments mention parameters too ("with a positive $6 ..."): drop them first.
    code = _COMMENT.sub("", sql)
    return _PARAM.sub(swap, code.replace("%", "%%")), ordered


def _module(conn: object) -> str:
    return type(conn).__module__ or ""


def kind(conn: object) -> str:
    """``asyncpg`` | ``sqlalchemy`` | ``psycopg_async`` | ``psycopg`` | ``django``."""
    module = _module(conn)
    if module.startswith("sqlalchemy."):
        return "sqlalchemy"
    if module.startswith("psycopg"):
        import psycopg

        if isinstance(conn, psycopg.AsyncConnection):
            return "psycopg_async"
        if isinstance(conn, psycopg.Connection):
            return "psycopg"
    if module.startswith("django.") and hasattr(conn, "in_atomic_block"):
        return "django"
    if hasattr(conn, "is_in_transaction") and hasattr(conn, "fetchrow"):
        return "asyncpg"  # asyncpg.Connection or a pool's connection proxy
    raise ConfigurationError(
        f"connection= takes an asyncpg connection, a SQLAlchemy AsyncConnection/AsyncSession, "
        f"a psycopg 3 connection or Django's connection; got {type(conn).__name__} from "
        f"{module or 'an unknown module'}."
    )


async def unwrap(conn: Any) -> Any:
    """The driver connection under a SQLAlchemy async connection or session.

    SQLAlchemy begins its transaction lazily, at the first statement: one is
    sent first so that the run is inserted inside that transaction, not
    committed on its own.
    """
    if kind(conn) != "sqlalchemy":
        return conn
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    if isinstance(conn, AsyncSession):
        conn = await conn.connection()
    if not isinstance(conn, AsyncConnection):
        raise ConfigurationError(
            f"connection= takes a SQLAlchemy AsyncConnection or AsyncSession, "
            f"got {type(conn).__name__}."
        )
    if conn.in_transaction():
        await conn.exec_driver_sql("SELECT 1")
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    if driver is None or kind(driver) not in ("asyncpg", "psycopg_async"):
        raise ConfigurationError(
            "flowkeeper triggers through SQLAlchemy on the asyncpg or psycopg async driver "
            "(postgresql+asyncpg:// or postgresql+psycopg://); this engine uses "
            f"{type(driver).__name__}."
        )
    return driver


InsertArgs = tuple[uuid.UUID, str, str, str | None, uuid.UUID | None, timedelta]


async def insert_run_psycopg_async(
    queries: dict[str, str], conn: Any, insert: tuple[Any, ...]
) -> tuple[str, bool]:
    """``insert_run`` on a psycopg 3 async connection; (run id, created).

    ``insert``: the query's arguments (Store.insert_args), never leased: the
    caller's transaction decides when the run exists, so nobody could push it
    now; the scheduler (NOTIFY) or an on-commit push does.
    """
    run_id, workflow, idempotency_key = str(insert[0]), insert[1], insert[3]
    sql, args = dbapi_query(queries["insert_run"], insert)
    async with conn.cursor() as cur:
        await cur.execute(sql, args)
        row = await cur.fetchone()
        if row is not None:
            return str(row[0]), True
        sql, args = dbapi_query(
            queries["run_by_id_or_key"], (uuid.UUID(run_id), workflow, idempotency_key)
        )
        await cur.execute(sql, args)
        return _conflict(await cur.fetchone(), run_id)


def insert_run_sync(
    queries: dict[str, str], conn: Any, insert: tuple[Any, ...]
) -> tuple[str, bool]:
    """``insert_run`` on a sync psycopg 3 or Django connection; (run id, created).

    ``insert``: as for :func:`insert_run_psycopg_async`.
    """
    run_id, workflow, idempotency_key = str(insert[0]), insert[1], insert[3]
    sql, args = dbapi_query(queries["insert_run"], insert)
    if kind(conn) == "django":
        # Django's cursor wants strings for uuid and interval parameters on some backends.
        args = [str(a) if isinstance(a, uuid.UUID) else a for a in args]
    with conn.cursor() as cur:
        cur.execute(sql, args)
        row = cur.fetchone()
        if row is not None:
            return str(row[0]), True
        sql, args = dbapi_query(
            queries["run_by_id_or_key"], (str(uuid.UUID(run_id)), workflow, idempotency_key)
        )
        cur.execute(sql, args)
        return _conflict(cur.fetchone(), run_id)


def _conflict(row: Any, run_id: str) -> tuple[str, bool]:
    if row is None:  # pragma: no cover - the conflicting run was deleted meanwhile
        raise DatabaseError("the run conflicted with one that no longer exists; trigger again")
    found = str(row[0])
    return found, found == run_id


def sync_in_transaction(conn: Any) -> bool:
    """Whether a sync psycopg or Django connection is inside a transaction now."""
    if kind(conn) == "django":
        return bool(conn.in_atomic_block)
    import psycopg.pq

    return bool(conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE)


def after_commit(conn: Any, callback: Callable[[], None]) -> bool:
    """Run ``callback`` once the caller's transaction commits, where the library can say.

    Django can (``transaction.on_commit``); psycopg cannot, and the run is
    left to the scheduler (its insert NOTIFYs the scheduler loop at commit).
    """
    if kind(conn) == "django":
        from django.db import transaction

        alias = getattr(conn, "alias", None) or "default"
        transaction.on_commit(callback, using=alias)
        return True
    return False
