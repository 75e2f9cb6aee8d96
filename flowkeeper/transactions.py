"""``ctx.transaction``: a step whose effect on the app's own tables happens exactly once.

The user's function gets an asyncpg connection inside a transaction; before
that transaction commits, flowkeeper writes the step's record (with any
records the invocation had not written yet) on the same connection, with the
same lease check as every other write.  The user's writes and the record
commit together or not at all:

- the process dies before the commit: Postgres rolls both back; the lease
  expires, the attempt counts as lost, and the step runs again;
- it dies after the commit: the record is there, and a replay returns it
  without running the function again;
- another invocation took the run over meanwhile: the lease check refuses
  the record, the transaction is rolled back, this invocation stops;
- two invocations both reach the commit (a stale one whose lease check ran
  before the takeover): the step record's primary key (run, step key) lets
  only one commit; the other rolls back with its writes.

The record is the write a plain step makes anyway (a plain step's record is
written with the next write; this one with the transaction), so a
transaction step costs no more commits than a plain one.  A transaction
failure (a serialization failure, a deadlock, a lost connection) rolls back
and is retried with the step's retry policy.  The connection comes from
flowkeeper's own pool (the same database by construction; works behind a
transaction pooler, no session state is used), or from ``pool=`` — which
must reach the same database, or :class:`TransactionDatabaseError` says so.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from . import serialization, stepctx
from .errors import (
    DatabaseError,
    DatabaseRefusedError,
    StepUsageError,
    TransactionDatabaseError,
    TransactionUsageError,
)
from .store import StepRecord

if TYPE_CHECKING:
    import asyncpg

    from .engine import Execution

Isolation = Literal["read_committed", "repeatable_read", "serializable"]
ISOLATIONS = ("read_committed", "repeatable_read", "serializable")
KIND = "transaction"

# SQLSTATEs saying the user's function broke the transaction it was given.
_NO_TRANSACTION = "25P01"  # no_active_sql_transaction: fn sent COMMIT or ROLLBACK
_FAILED_TRANSACTION = "25P02"  # in_failed_sql_transaction: fn swallowed an error


class _LeaseLost(Exception):
    """The record was refused: another invocation holds the run, or recorded the step."""


class AcquiresConnections(Protocol):
    """What ``pool=`` must be: an ``asyncpg.Pool``, or anything with the same ``acquire()``."""

    def acquire(self) -> Any: ...


def check_call(name: str, fn: Any, isolation: str) -> Isolation:
    """Refuse a bad call before anything is recorded; the isolation level to use."""
    if not callable(fn):
        raise StepUsageError(
            f"ctx.transaction({name!r}, ...) needs an async function taking an asyncpg "
            f"connection first, got {fn!r}."
        )
    if isolation not in ISOLATIONS:
        raise StepUsageError(
            f"ctx.transaction({name!r}, ...): isolation must be one of {', '.join(ISOLATIONS)}, "
            f"got {isolation!r}."
        )
    return cast("Isolation", isolation)


def body(
    execution: Execution,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    position: int,
    name: str,
    isolation: Isolation,
    pool: AcquiresConnections | None,
) -> Callable[[], Any]:
    """The step body the engine runs: the user's transaction, recording the step inside it.

    It carries ``fn``'s annotations (functools.wraps), so the engine restores its
    result as ``fn``'s return annotation says, now and on replay.
    """

    async def transaction() -> Any:
        try:
            return await _attempt()
        except _LeaseLost:
            # Rolled back by now: only then may the run be let go of (its row was locked).
            from .engine import _Suspend

            raise _Suspend(await execution._lost()) from None

    async def _attempt() -> Any:
        step = stepctx.current_step()
        started = execution.db_time()
        async with _connection(execution, pool) as conn, conn.transaction(isolation=isolation):
            await _check_run(execution, conn)
            result = fn(conn, *args, **kwargs)
            if not inspect.isawaitable(result):
                raise TransactionUsageError(
                    f"ctx.transaction({name!r}, ...): {fn!r} returned {type(result).__name__}, "
                    "not an awaitable: it must be an async function (async def f(conn, ...)) "
                    "that runs its queries on the asyncpg connection it is given."
                )
            value = await result
            if not conn.is_in_transaction():
                raise TransactionUsageError(
                    f"ctx.transaction({name!r}, ...): {fn!r} ended the transaction it was "
                    "given (COMMIT or ROLLBACK): leave the transaction to flowkeeper, which "
                    "commits your writes with the step's record."
                )
            hint = serialization.return_hint(transaction)
            output = serialization.dumps(value, what=f"The result of step {step.step_key!r}")
            tag = serialization.type_tag(value) if hint is None else None
            record = StepRecord(
                key=step.step_key,
                position=position,
                name=name,
                kind=KIND,
                status="completed",
                input=execution._input_json(args, kwargs),
                output=output,
                output_type=tag,
                error=None,
                attempts=step.attempt,
                started_at=started,
                finished_at=execution.db_time(),
            )
            await _record(execution, conn, record, fn)
        return value

    functools.update_wrapper(transaction, fn, assigned=("__annotations__", "__doc__"))
    return transaction


@contextlib.asynccontextmanager
async def _connection(
    execution: Execution, pool: AcquiresConnections | None
) -> AsyncIterator[asyncpg.Connection]:
    if pool is not None:
        async with pool.acquire() as conn:
            yield conn
        return
    import asyncpg

    db = execution.store.db
    conn = await db.get()
    reusable = False
    try:
        yield conn
        reusable = True
    except asyncpg.PostgresError:
        reusable = True  # the server refused a statement; the transaction was rolled back
        raise
    finally:
        db.put(conn, reusable=reusable)


async def _check_run(execution: Execution, conn: asyncpg.Connection) -> None:
    """The connection must reach this run in flowkeeper's schema (the same database)."""
    import asyncpg

    store = execution.store
    try:
        row = await conn.fetchrow(
            store.q["transaction_run_check"], _uuid(execution.run_id), execution.token
        )
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError) as exc:
        raise TransactionDatabaseError(
            f"ctx.transaction: the connection it was given has no flowkeeper schema "
            f"{store.schema!r} ({exc}). The step's record must commit in the same transaction "
            "as your writes, so it needs the database flowkeeper uses: keep your tables "
            "there (another schema is fine), or drop pool= to use flowkeeper's own connection."
        ) from exc
    if row is None:
        raise TransactionDatabaseError(
            f"ctx.transaction: the connection it was given reaches a flowkeeper schema "
            f"{store.schema!r}, but not run {execution.run_id}: it is another database. Give "
            "ctx.transaction a pool of the database this FlowKeeper uses (or no pool=)."
        )


async def _record(
    execution: Execution,
    conn: asyncpg.Connection,
    record: StepRecord,
    fn: Callable[..., Any],
) -> None:
    """Write the step's record (and what the invocation had pending) in the transaction."""
    import asyncpg

    from .engine import _Abort

    steps, events = execution._take_pending()
    await execution._publisher.flush()  # a step's messages are stored before its result
    try:
        ok = await execution.store.commit(
            execution.run_id,
            execution.token,
            status="running",
            new_token=execution.token,
            keep_due=True,
            steps=[*steps, record],
            events=events,
            conn=conn,
        )
    except DatabaseRefusedError as exc:
        cause = exc.__cause__
        if isinstance(cause, asyncpg.UniqueViolationError) and "steps_pkey" in str(
            cause.constraint_name or ""
        ):
            # Another invocation recorded this step first: ours rolls back with its writes.
            raise _LeaseLost from None
        raise
    except DatabaseError as exc:
        cause = exc.__cause__
        state = getattr(cause, "sqlstate", None)
        if state in (_NO_TRANSACTION, _FAILED_TRANSACTION):
            raise TransactionUsageError(
                f"ctx.transaction: {fn!r} left the transaction it was given unusable "
                f"({type(cause).__name__}: {cause}). Let database errors propagate (or use "
                "`async with conn.transaction():` for a savepoint you may roll back), and "
                "never COMMIT or ROLLBACK yourself."
            ) from None
        if isinstance(cause, asyncpg.PostgresError) and state and state[:2] == "40":
            raise cause from None  # serialization failure, deadlock: retried by the policy
        raise _Abort(exc) from exc
    if ok is False:
        raise _LeaseLost


def _uuid(run_id: str) -> Any:
    import uuid

    return uuid.UUID(run_id)
