"""The store: every query flowkeeper sends goes through here.

The engine, the scheduler and the endpoint speak to Postgres only through
these methods; the SQL itself lives in ``sql/queries.sql``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from . import migrations, serialization
from .codec import Codec, DecryptionError, Sealer
from .db import Database
from .errors import DatabaseError, DatabaseRefusedError, MigrationError
from .groupcommit import BatchRefused, GroupCommit
from .serialization import display_json
from .sql import load_queries

if TYPE_CHECKING:
    import asyncpg

logger = logging.getLogger("flowkeeper")


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """A recorded step or sleep, as the engine replays it."""

    key: str
    position: int
    name: str
    kind: str
    status: str
    output: str | None
    output_type: str | None
    error: dict[str, Any] | None
    attempts: int
    wake_at: datetime | None


@dataclass(frozen=True, slots=True)
class ClaimedRun:
    """A run this invocation now holds the lease of."""

    run_id: str
    lease_token: uuid.UUID
    workflow: str
    input: str | None
    step_key: str | None
    step_attempt: int
    invocations: int
    db_now: datetime
    history: list[HistoryEntry]
    # Invocations of this run that ended while executing, since its last write:
    # each was inside the step at the frontier (an attempt lost with its process).
    lost_attempts: int = 0
    created_at: datetime | None = None  # when the run was triggered (a wait's default lookback)
    parent_id: str | None = None  # the run that started this one (flowkeeper.children)


@dataclass(frozen=True, slots=True)
class StepRecord:
    """A step or sleep the engine has not written yet."""

    key: str
    position: int
    name: str
    kind: str
    status: str
    input: str | None
    output: str | bytes | None  # bytes: a large value, as serialization.dumps_for_storage
    output_type: str | None
    error: dict[str, Any] | None
    attempts: int
    started_at: datetime
    finished_at: datetime | None
    wake_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class EventRecord:
    kind: str
    step_key: str | None = None
    attempt: int | None = None
    detail: dict[str, Any] | None = None


#: Step outputs longer than this (bytes or characters of JSON) are sent ahead in chunks.
STAGE_ABOVE = serialization.LARGE_JSON
#: The most bytes of step values (as stored; at most work_mem / 1024) and steps
#: a claim returns with the run, as JSON; a larger history is read as rows in a
#: statement of its own (claim_run, claim_history).
HISTORY_INLINE_BYTES = 16_384
HISTORY_INLINE_STEPS = 16
#: The size of one chunk (bytes; characters for an output given as text).
CHUNK = 2_000_000


def _text(value: str | bytes | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _stored_outputs(steps: Sequence[StepRecord], sealer: Sealer) -> list[str | bytes | None]:
    """Each step's output as it will be stored: sealed when a codec is on."""
    return [
        sealer.seal_json(_text(s.output)) if sealer.on and s.kind != "patch" else s.output
        for s in steps
    ]


def _step_columns(
    steps: Sequence[StepRecord],
    outputs: Sequence[str | bytes | None],
    staged: Sequence[int],
    sealer: Sealer,
) -> list[list[Any]]:
    """The commit query takes one array per column (unnest): no JSON to build or parse."""
    # Patch markers are read by SQL (sql/patches.sql): never sealed.
    seal = [sealer.on and s.kind != "patch" for s in steps]
    return [
        [s.key for s in steps],
        [s.position for s in steps],
        [s.name for s in steps],
        [s.kind for s in steps],
        [s.status for s in steps],
        [sealer.seal_json(s.input) if z else s.input for s, z in zip(steps, seal, strict=True)],
        [None if n else _text(o) for o, n in zip(outputs, staged, strict=True)],
        [s.output_type for s in steps],
        [display_json(sealer.seal_error(s.error)) if s.error is not None else None for s in steps],
        [s.attempts for s in steps],
        [s.started_at for s in steps],
        [s.finished_at for s in steps],
        [s.wake_at for s in steps],
    ]


def _event_columns(events: Sequence[EventRecord], sealer: Sealer) -> list[list[Any]]:
    return [
        [e.kind for e in events],
        [e.step_key for e in events],
        [e.attempt for e in events],
        [
            display_json(sealer.seal_error(e.detail)) if e.detail is not None else None
            for e in events
        ],
    ]


def _claimed_run(
    row: Any, token: uuid.UUID, history: list[HistoryEntry], input_text: str | None
) -> ClaimedRun:
    """A claim query's row (create_claimed_run, claim_run) as the engine takes it.

    ``input_text``: the run's input as stored (sealed when a codec is on): the
    creates do not send it back (the caller has the text it sent), and a claim
    sends a large one apart (migration 27)."""
    return ClaimedRun(
        run_id=str(row["id"]),
        lease_token=token,
        workflow=row["workflow"],
        input=input_text,
        step_key=row["step_key"],
        step_attempt=row["step_attempt"],
        invocations=row["invocations"],
        db_now=row["db_now"],
        history=history,
        lost_attempts=row["lost_attempts"],
        created_at=row["created_at"],
        parent_id=str(row["parent_id"]) if row["parent_id"] is not None else None,
    )


def _history_entry(
    step: Any, error: dict[str, Any] | None, wake_at: datetime | None
) -> HistoryEntry:
    """One step of a claimed history (claim_run's JSON or claim_history's row)."""
    return HistoryEntry(
        key=step["key"],
        position=step["position"],
        name=step["name"],
        kind=step["kind"],
        status=step["status"],
        output=step["output"],
        output_type=step["output_type"],
        error=error,
        attempts=step["attempts"],
        wake_at=wake_at,
    )


def _opened(
    row: Any, sealer: Sealer, whole: Sequence[str], errors: Sequence[str]
) -> dict[str, Any]:
    """A row as a dict, its sealed JSON columns (``whole``) and error messages opened."""
    out = dict(row)
    for name in whole:
        out[name] = sealer.open_json(out[name])
    for name in errors:
        text = out[name]
        if text is not None and "fk:enc:" in text:
            out[name] = display_json(sealer.open_error(json.loads(text)))
    return out


def _wait_opened(step: dict[str, Any], sealer: Sealer) -> dict[str, Any]:
    """A wait's history entry with the match it recorded opened (it is sealed inside)."""
    text = step.get("input")
    if step.get("kind") == "wait" and isinstance(text, str) and '"fk:enc:' in text:
        recorded = json.loads(text)
        sealed = recorded.get("match")
        if isinstance(sealed, str):
            recorded["match"] = json.loads(sealer.open_json(json.dumps(sealed)) or "null")
            step["input"] = json.dumps(recorded)
    return step


#: commit_lean's arguments: the run's columns, one list per step column, keep_due.
_RUN_COLUMNS = 10
_STEP_COLUMNS = 13
_KEEP_DUE = _RUN_COLUMNS + _STEP_COLUMNS
#: flow_prelock's arguments (Store._prelock): runs, concurrency keys, rate keys.
Prelock = tuple[list[uuid.UUID], list[str], list[str]]
#: A merged statement's flow_prelock arguments when it takes none.
_NO_PRELOCK: tuple[None, None, None] = (None, None, None)
#: The merged statements that take their batch's flow_prelock themselves.
_PRELOCKING = frozenset({"commit_lean_many", "create_gated_many"})
#: create_gated_run's arguments (Store.insert_args): its concurrency and rate keys.
_GATE_KEYS = 6
_GATE_RATE_KEYS = 11


#: Creates of new runs a batch sends as one statement each kind (see _statements).
_MERGED_CREATES = {
    "create_claimed_run": "create_claimed_many",
    "create_gated_run": "create_gated_many",
}


#: A merged statement's values stop growing past this many characters or bytes:
#: the next write starts another statement (a bind message is held whole by
#: the driver and by the server, which refuses one over 1 GB).
MERGE_BYTES = 16 * 1024 * 1024


#: Where the values that can be large sit in each mergeable write's arguments:
#: plain ones, and per-step lists (commit_lean's step inputs, outputs, errors).
_LARGE_VALUES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "create_claimed_run": ((2,), ()),
    "create_gated_run": ((2,), ()),
    "commit_lean": ((6, 7), (_RUN_COLUMNS + 5, _RUN_COLUMNS + 6, _RUN_COLUMNS + 8)),
}


def _size(name: str, args: tuple[Any, ...]) -> int:
    """About how large a write's values are (characters or bytes)."""
    plain, lists = _LARGE_VALUES[name]
    total = 0
    for i in plain:
        if args[i] is not None:
            total += len(args[i])
    for i in lists:
        for value in args[i]:
            if value is not None:
                total += len(value)
    return total


def _capped(at: list[int], writes: Sequence[tuple[str, tuple[Any, ...]]]) -> Iterator[list[int]]:
    """``at`` cut into runs of writes whose values add up to at most MERGE_BYTES
    (a write larger than that alone)."""
    group: list[int] = []
    size = 0
    for i in at:
        grows = _size(*writes[i])
        if group and size + grows > MERGE_BYTES:
            yield group
            group, size = [], 0
        group.append(i)
        size += grows
    if group:
        yield group


def _statements(writes: Sequence[tuple[str, tuple[Any, ...]]]) -> Iterator[tuple[str, list[int]]]:
    """A batch's writes as statements, each with the positions of the writes it holds.

    Two or more creates of new runs of one kind (create_claimed_run, or
    create_gated_run for flow-controlled ones) become one statement, sent
    first: no other write of the batch can be of a run not created yet, the
    batch's writes are concurrent (any order is one they could have arrived
    in), and conflicts among the creates resolve as one by one.  Then, in
    order, consecutive commit_lean writes of different runs become one
    commit_lean_many; every other write stays itself.  A merged statement
    holds at most MERGE_BYTES of values (see _capped).
    """
    rest = list(range(len(writes)))
    for one, many in _MERGED_CREATES.items():
        creates = [i for i in rest if writes[i][0] == one]
        if len(creates) > 1:
            for group in _capped(creates, writes):
                yield (many if len(group) > 1 else one), group
            rest = [i for i in rest if writes[i][0] != one]
    k = 0
    while k < len(rest):
        j, runs = k, set()
        while j < len(rest) and writes[rest[j]][0] == "commit_lean":
            run = writes[rest[j]][1][0]
            if run in runs:
                break  # a run's two writes (parallel branches) stay apart
            runs.add(run)
            j += 1
        if j - k > 1:
            for group in _capped(rest[k:j], writes):
                yield ("commit_lean_many" if len(group) > 1 else "commit_lean"), group
            k = j
        else:
            yield writes[rest[k]][0], [rest[k]]
            k += 1


def _shown(row: Any, sealer: Sealer, column: str) -> dict[str, Any]:
    """A row for display with ``column`` opened; one whose key is gone says so instead."""
    try:
        return _opened(row, sealer, (column,), ())
    except DecryptionError as exc:
        out = dict(row)
        out[column] = json.dumps(f"(sealed, cannot be opened here: {exc})")
        return out


def _postgres_error() -> type[BaseException]:
    import asyncpg

    return asyncpg.PostgresError


# SQLSTATE classes that say the value itself is wrong: data exceptions (22: NUL
# in text, bad JSON, numbers out of range) and integrity violations (23).  The
# same statement would fail the same way, so they are never retried.
_PERMANENT_CLASSES = ("22", "23")


def _refused(name: str, exc: BaseException) -> DatabaseRefusedError | None:
    """The permanent refusal ``exc`` stands for, or None when it may be transient."""
    import asyncpg

    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        if state[:2] in _PERMANENT_CLASSES:
            return DatabaseRefusedError(name, state, f"{type(exc).__name__}: {exc}")
        return None
    # Raised by the driver before anything is sent: a value it cannot encode.
    if isinstance(exc, asyncpg.DataError | UnicodeError):
        return DatabaseRefusedError(name, None, f"{type(exc).__name__}: {exc}")
    return None


def _conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is a transaction rollback (SQLSTATE class 40: deadlock, serialization)."""
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, _postgres_error()) and state.startswith("40")


def _raise_mapped(name: str, exc: Exception, hint: DatabaseError | None = None) -> None:
    """Raise the flowkeeper error ``exc`` from query ``name`` stands for, if any.

    ``hint``: a more helpful error for this one (a missing grant), raised instead.
    """
    refused = _refused(name, exc)
    if refused is not None:
        raise refused from exc
    if hint is not None:
        raise hint from exc
    if isinstance(exc, _connection_errors()):
        raise DatabaseError(
            f"Lost the connection to Postgres during {name}: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(exc, _postgres_error()):
        raise DatabaseError(
            f"Postgres refused flowkeeper's {name} query: {type(exc).__name__}: {exc}. "
            "If the flowkeeper schema was changed by hand, run `flowkeeper migrate`; "
            "behind a transaction pooler, make sure it is detected (pooled=True)."
        ) from exc


def privilege_hint(schema: str, role: str | None, exc: BaseException) -> DatabaseError | None:
    """A missing grant (SQLSTATE 42501) as an error naming the grants to run, else None."""
    if getattr(exc, "sqlstate", None) != "42501":
        return None
    who = role or "<your app's role>"
    return DatabaseError(
        f"The database role {who!r} lacks a right on flowkeeper's schema {schema!r} ({exc}). "
        f"As the schema's owner run: GRANT USAGE ON SCHEMA {schema} TO {who}; "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {who}; "
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {who}; "
        f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {who}; "
        "or run `flowkeeper migrate` as that role once so that it owns the schema."
    )


def _connection_errors() -> tuple[type[BaseException], ...]:
    import asyncpg

    return (
        OSError,
        asyncio.TimeoutError,
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        asyncpg.CannotConnectNowError,
        asyncpg.AdminShutdownError,
    )


class Store:
    """Typed access to the flowkeeper schema."""

    def __init__(
        self,
        db: Database,
        schema: str,
        *,
        auto_migrate: bool = True,
        group_commit: bool = True,
        codec: Codec | None = None,
    ) -> None:
        self.db = db
        #: Seals payloads on the way in, opens them on the way out (flowkeeper.codec).
        self.sealer = Sealer(codec)
        self.schema = schema
        self.q = load_queries(schema)
        self.auto_migrate = auto_migrate
        #: Whether concurrent writes share transactions (flowkeeper.groupcommit).
        self.group_commit = group_commit
        #: Step writes without events use the lean statement, and a group commit
        #: batch's consecutive lean writes go as one statement (bench.growth
        #: --only lean turns each off to compare).
        self.lean_commit = True
        self.merge_commits = True
        #: Runs with a flow-controlled write in flight (concurrency keys whose slots
        #: its end releases): a batch of several takes their keys first.
        self._flow_writes: dict[uuid.UUID, int] = {}
        self._groups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GroupCommit[Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._ready = False
        self._ready_lock: asyncio.Lock | None = None

    # plumbing ---------------------------------------------------------------
    async def _call(
        self, method: str, name: str, *args: Any, conn: asyncpg.Connection | None = None
    ) -> Any:
        if not self._ready and conn is None:
            await self.ensure_schema()
        query = self.q[name]
        try:
            if conn is not None:
                return await getattr(conn, method)(query, *args)
            own = await self.db.get()
            try:
                result = await getattr(own, method)(query, *args)
            except BaseException as exc:
                # Reusable only when the server refused the statement: after a
                # cancellation, a timeout or a socket error its state is unknown.
                self.db.put(own, reusable=isinstance(exc, _postgres_error()))
                raise
            self.db.put(own)
            return result
        except Exception as exc:
            _raise_mapped(name, exc, privilege_hint(self.schema, self.db.role, exc))
            raise

    async def _call_many(self, writes: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """Run each (statement, arguments), in order, in one transaction (a single
        statement, the common batch, on its own: it is atomic without BEGIN).

        Raises :class:`BatchRefused` (nothing committed) when Postgres refuses
        one of them permanently or rolls the transaction back (a deadlock), so
        that the caller can send each again alone.
        """
        import asyncpg

        if not self._ready:
            await self.ensure_schema()
        name = writes[0][0]
        try:
            prelock = self._prelock(writes)
            statements = (
                list(_statements(writes))
                if self.merge_commits
                else [(n, [i]) for i, (n, _) in enumerate(writes)]
            )
            # A merged statement that comes first takes the prelock itself, before
            # it writes anything: one round trip less, and none more at all when
            # it is the batch's only statement.
            folded = prelock is not None and statements[0][0] in _PRELOCKING
            own = await self.db.get()
            try:
                rows: list[Any] = [None] * len(writes)
                if len(statements) == 1 and (prelock is None or folded):
                    # One statement is atomic by itself: no BEGIN and COMMIT round
                    # trips (the common batch: every write one merged statement).
                    name = statements[0][0]
                    await self._statement(own, writes, *statements[0], rows, prelock)
                else:
                    async with own.transaction():
                        if prelock is not None and not folded:
                            await own.execute(self.q["flow_prelock"], *prelock)
                        for k, (name, at) in enumerate(statements):
                            first = prelock if folded and k == 0 else None
                            await self._statement(own, writes, name, at, rows, first)
            except BaseException as exc:
                # After a refusal the transaction was rolled back: reusable.
                refusal = isinstance(exc, _postgres_error() | asyncpg.DataError | UnicodeError)
                self.db.put(own, reusable=refusal)
                raise
            self.db.put(own)
            return rows
        except Exception as exc:
            # A refusal, or a deadlock / serialization failure between two
            # batches (duplicate triggers crossing each other): rolled back,
            # nothing committed; each write is sent again alone.
            if _refused(name, exc) is not None or _conflict(exc):
                raise BatchRefused(name) from exc
            _raise_mapped(name, exc, privilege_hint(self.schema, self.db.role, exc))
            raise

    async def _statement(
        self,
        conn: asyncpg.Connection,
        writes: Sequence[tuple[str, tuple[Any, ...]]],
        name: str,
        at: list[int],
        rows: list[Any],
        prelock: Prelock | None = None,
    ) -> None:
        """One statement of a batch (see _statements), holding the writes at ``at``:
        their rows go to the same places of ``rows``.  ``prelock``: the batch's
        flow_prelock, for a statement of _PRELOCKING to take first."""
        group = [writes[i][1] for i in at]
        if name == "commit_lean_many":
            took = await self._commit_many(conn, group, prelock)
        elif name == "create_claimed_many":
            took = await self._create_many(conn, group)
        elif name == "create_gated_many":
            took = await self._create_gated_many(conn, group, prelock)
        else:
            took = [await conn.fetchrow(self.q[name], *group[0])]
        for i, row in zip(at, took, strict=True):
            rows[i] = row

    async def _create_many(
        self, conn: asyncpg.Connection, creates: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        """Several create_claimed_run writes as one statement; a row each, None where
        the run was not created (its id or idempotency key taken, as alone: by an
        earlier run, or by an earlier write of this batch)."""
        columns = [list(column) for column in zip(*creates, strict=True)]
        made = await conn.fetch(self.q["create_claimed_many"], *columns)
        # Of the writes with one id, workflow and idempotency key (a create handed
        # over twice), only the first can have been inserted: the others conflict
        # with it.  Writes that differ in any of them conflict or not on their own.
        took = {(row["id"], row["workflow"], row["idempotency_key"]): row for row in made}
        return [took.pop((args[0], args[1], args[3]), None) for args in creates]

    async def _create_gated_many(
        self,
        conn: asyncpg.Connection,
        creates: Sequence[tuple[Any, ...]],
        prelock: Prelock | None = None,
    ) -> list[Any]:
        """Several create_gated_run writes (Store.insert_args) as one statement; a row
        each, its outcome, in order."""
        scalars = [[w[i] for w in creates] for i in (0, 1, 2, 3, 4, 5, 8, 9, 10, 13)]
        counts = [[None if w[i] is None else len(w[i]) for w in creates] for i in (6, 7, 11, 12)]
        ragged = [[x for w in creates for x in (w[i] or ())] for i in (6, 7, 11, 12)]
        made = await conn.fetch(
            self.q["create_gated_many"], *scalars, *counts, *ragged, *(prelock or _NO_PRELOCK)
        )
        by_ord = {row["ord"]: row for row in made}
        return [by_ord.get(k) for k in range(1, len(creates) + 1)]

    def _prelock(self, writes: Sequence[tuple[str, tuple[Any, ...]]]) -> Prelock | None:
        """flow_prelock's arguments for a batch of two or more writes that lock
        flow-control keys (migration 0019), else None: one such write alone takes
        its keys in order by itself, and other writes take none."""
        runs: list[uuid.UUID] = []
        keys: list[str] = []
        rate_keys: list[str] = []
        for name, args in writes:
            if name == "create_gated_run":
                keys += args[_GATE_KEYS] or ()
                rate_keys += args[_GATE_RATE_KEYS] or ()
                if args[_GATE_KEYS] or args[_GATE_RATE_KEYS]:
                    # Counted; its row is locked too if it exists (a replayed create).
                    runs.append(args[0])
            elif args and args[0] in self._flow_writes:
                runs.append(args[0])
        if len(runs) < 2:
            return None
        return runs, keys, rate_keys

    async def _commit_many(
        self,
        conn: asyncpg.Connection,
        writes: Sequence[tuple[Any, ...]],
        prelock: Prelock | None = None,
    ) -> list[Any]:
        """Several commit_lean writes (of different runs) as one statement; a row each."""
        runs = [[w[i] for w in writes] for i in (*range(_RUN_COLUMNS), _KEEP_DUE)]
        steps: list[list[Any]] = [[] for _ in range(_STEP_COLUMNS + 1)]
        for ord_, w in enumerate(writes, start=1):
            steps[0] += [ord_] * len(w[_RUN_COLUMNS])
            for c in range(_STEP_COLUMNS):
                steps[c + 1] += w[_RUN_COLUMNS + c]
        took = {
            r["ord"]: {"id": r["id"], "due_at": r["due_at"]}
            for r in await conn.fetch(
                self.q["commit_lean_many"], *runs, *steps, *(prelock or _NO_PRELOCK)
            )
        }
        return [took.get(k) for k in range(1, len(writes) + 1)]

    def _group(self) -> GroupCommit[Any]:
        """This event loop's group commit."""
        loop = asyncio.get_running_loop()
        group = self._groups.get(loop)
        if group is None:
            group = self._groups[loop] = GroupCommit(
                lambda write: self._call("fetchrow", write[0], *write[1]),
                self._call_many,
                max_inflight=self.db.max_size,
            )
        return group

    async def _write(self, name: str, *args: Any) -> Any:
        """One fenced write, combined with concurrent ones when group commit is on."""
        if not self.group_commit:
            return await self._call("fetchrow", name, *args)
        return await self._group().submit(name, args)

    async def ensure_schema(self) -> None:
        """Check the schema version once per process; migrate if allowed and needed."""
        if self._ready:
            return
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            if self._ready:
                return
            async with self.db.acquire() as conn:
                try:
                    version = await migrations.current_version(conn, self.schema)
                except _connection_errors() as exc:
                    raise DatabaseError(f"Lost the connection to Postgres: {exc}") from exc
                except _postgres_error() as exc:
                    hint = privilege_hint(self.schema, self.db.role, exc)
                    if hint is not None:
                        raise hint from exc
                    raise
                latest = migrations.latest_version()
                if version < latest:
                    if not self.auto_migrate:
                        raise MigrationError(
                            f"Schema {self.schema!r} is at version {version}, this flowkeeper "
                            f"needs {latest}. Run `flowkeeper migrate`."
                        )
                    await migrations.migrate(conn, self.schema)
                elif version > latest:
                    await self._check_newer_schema(conn, version, latest)
            self._ready = True

    async def _check_newer_schema(
        self, conn: asyncpg.Connection, version: int, latest: int
    ) -> None:
        """A newer deploy migrated already (a rolling upgrade): go on if it is compatible."""
        needed = await migrations.required_library(conn, self.schema, latest)
        if needed > latest:
            raise MigrationError(
                f"Schema {self.schema!r} is at version {version}, which needs a flowkeeper that "
                f"knows schema version {needed} or later; this flowkeeper knows up to version "
                f"{latest}. Upgrade flowkeeper in this deployment (instances still on the old "
                "version refuse to start until they are replaced)."
            )
        logger.info(
            "schema %s is at version %d, newer than this flowkeeper's %d, and compatible with "
            "it (a rolling upgrade in progress?); going on",
            self.schema,
            version,
            latest,
        )

    async def migrate(self) -> list[int]:
        async with self.db.acquire() as conn:
            applied = await migrations.migrate(conn, self.schema)
        self._ready = True
        return applied

    # runs ---------------------------------------------------------------------
    def insert_args(
        self,
        *,
        run_id: str,
        workflow: str,
        input_json: str,
        idempotency_key: str | None,
        lease_token: uuid.UUID | None,
        lease: timedelta,
        code_version: str | None = None,
        flow_keys: list[str] | None = None,
        flow_limits: list[int] | None = None,
        priority: int = 0,
        timeout: timedelta | None = None,
        start_timeout: timedelta | None = None,
        rate_keys: list[str] | None = None,
        rate_spacing: list[timedelta] | None = None,
    ) -> tuple[Any, ...]:
        """The ``insert_run`` query's arguments, in order (its input sealed when a codec is on).

        Also what flowkeeper.foreign sends on another driver's connection.
        """
        return (
            uuid.UUID(run_id),
            workflow,
            self.sealer.seal_json(input_json),
            idempotency_key,
            lease_token,
            lease,
            flow_keys,
            flow_limits,
            priority,
            timeout,
            start_timeout,
            rate_keys,
            rate_spacing,
            code_version,
        )

    async def insert_run(
        self,
        *,
        run_id: str,
        workflow: str,
        input_json: str,
        idempotency_key: str | None,
        lease_token: uuid.UUID | None,
        lease: timedelta,
        conn: asyncpg.Connection | None = None,
        code_version: str | None = None,
        flow_keys: list[str] | None = None,
        flow_limits: list[int] | None = None,
        priority: int = 0,
        timeout: timedelta | None = None,
        start_timeout: timedelta | None = None,
        rate_keys: list[str] | None = None,
        rate_spacing: list[timedelta] | None = None,
    ) -> tuple[str, bool]:
        """Insert a run; on an idempotency-key hit return the existing id.

        ``flow_keys``/``flow_limits``: its concurrency keys, ``priority``,
        ``timeout``/``start_timeout`` (flowkeeper.flowcontrol).
        """
        if conn is not None and not self._ready:
            await self.ensure_schema()
        args = self.insert_args(
            run_id=run_id,
            workflow=workflow,
            input_json=input_json,
            idempotency_key=idempotency_key,
            lease_token=lease_token,
            lease=lease,
            code_version=code_version,
            flow_keys=flow_keys,
            flow_limits=flow_limits,
            priority=priority,
            timeout=timeout,
            start_timeout=start_timeout,
            rate_keys=rate_keys,
            rate_spacing=rate_spacing,
        )
        if conn is not None:
            row = await self._call("fetchrow", "insert_run", *args, conn=conn)
        else:
            row = await self._write("insert_run", *args)
        if row is not None:
            return str(row["id"]), True
        return await self._existing(run_id, workflow, idempotency_key, conn=conn)

    async def _existing(
        self,
        run_id: str,
        workflow: str,
        idempotency_key: str | None,
        *,
        conn: asyncpg.Connection | None = None,
    ) -> tuple[str, bool]:
        """The run an insert conflicted with: (id, whether it is this very run)."""
        existing = await self._call(
            "fetchrow", "run_by_id_or_key", uuid.UUID(run_id), workflow, idempotency_key, conn=conn
        )
        if existing is None:  # pragma: no cover - the conflicting run was deleted meanwhile
            raise DatabaseError("the run conflicted with one that no longer exists; trigger again")
        found = str(existing["id"])
        return found, found == run_id

    async def create_gated(
        self,
        *,
        run_id: str,
        workflow: str,
        input_json: str,
        idempotency_key: str | None,
        lease: timedelta,
        flow: Any,
        priority: int,
        timeout: timedelta | None,
        start_timeout: timedelta | None,
        code_version: str | None = None,
    ) -> ClaimedRun | tuple[str, bool] | None:
        """:meth:`create_claimed` for a flow-controlled run: inserted, asked through the
        flow gate and claimed in one statement (migration 0018).  None: created but not
        claimed (parked on a key, throttled, ...); a tuple: as :meth:`create_claimed`'s
        conflict."""
        token = uuid.uuid4()
        args = self.insert_args(
            run_id=run_id,
            workflow=workflow,
            input_json=input_json,
            idempotency_key=idempotency_key,
            lease_token=token,
            lease=lease,
            code_version=code_version,
            flow_keys=flow.keys,
            flow_limits=flow.limits,
            priority=priority,
            timeout=timeout,
            start_timeout=start_timeout,
            rate_keys=flow.rate_keys,
            rate_spacing=flow.rate_spacing,
        )
        # In a group commit batch with other gates and releases, their keys are
        # taken first, in key order (_prelock): batches cannot deadlock.
        row = await self._write("create_gated_run", *args)
        if row["outcome"] == "conflict":
            return await self._existing(run_id, workflow, idempotency_key)
        if row["outcome"] == "gated":
            return None
        return _claimed_run(row, token, [], args[2])

    async def create_claimed(
        self,
        *,
        run_id: str,
        workflow: str,
        input_json: str,
        idempotency_key: str | None,
        lease_token: uuid.UUID,
        lease: timedelta,
        code_version: str | None = None,
    ) -> ClaimedRun | tuple[str, bool]:
        """Create a run already leased to the caller (the endpoint), in one statement.

        On a conflict returns what :meth:`insert_run` would: the existing run's
        id and whether it is this run (created earlier under the same id).
        """
        sealed = self.sealer.seal_json(input_json)
        row = await self._write(
            "create_claimed_run",
            uuid.UUID(run_id),
            workflow,
            sealed,
            idempotency_key,
            lease_token,
            lease,
            code_version,
        )
        if row is None:
            return await self._existing(run_id, workflow, idempotency_key)
        return _claimed_run(row, lease_token, [], sealed)

    async def release_push(self, run_id: str, token: uuid.UUID) -> None:
        await self._call("execute", "release_push", uuid.UUID(run_id), token)

    async def claim(
        self,
        run_id: str,
        token: uuid.UUID | None,
        new_token: uuid.UUID,
        lease: timedelta,
        *,
        reach: timedelta = timedelta(0),
        conn: asyncpg.Connection | None = None,
    ) -> ClaimedRun | None:
        """Take the run's lease (claim_run); ``reach``: how far ahead a late
        rate-limited run may take a new start time for the caller to wait for."""
        args = (
            uuid.UUID(run_id),
            token,
            new_token,
            lease,
            reach,
            HISTORY_INLINE_BYTES,
            HISTORY_INLINE_STEPS,
        )
        if conn is not None:
            row = await self._call("fetchrow", "claim_run", *args, conn=conn)
        else:
            row = await self._write("claim_run", *args)
        if row is None:
            return None
        input_text = row["input"]
        if row["input_apart"]:  # left out for its size: sent as it is read
            input_text = await self._call("fetchval", "claim_input", uuid.UUID(run_id), conn=conn)
        if row["history_apart"]:
            # Left out for its size: read as rows, which Postgres sends as it
            # makes them (under the lease just taken, nothing else writes them;
            # in order: positions are unique).
            rows = await self._call("fetch", "claim_history", uuid.UUID(run_id), conn=conn)
            history = [
                _history_entry(
                    r, json.loads(r["error"]) if r["error"] is not None else None, r["wake_at"]
                )
                for r in rows
            ]
            return _claimed_run(row, new_token, history, input_text)
        history = [
            _history_entry(
                h, h["error"], datetime.fromisoformat(h["wake_at"]) if h["wake_at"] else None
            )
            for h in (json.loads(row["steps"]) if row["steps"] else [])
        ]
        history.sort(key=lambda h: h.position)  # claim_run sends it unordered
        return _claimed_run(row, new_token, history, input_text)

    async def run_state(self, run_id: str) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self._call("fetchrow", "run_state", uuid.UUID(run_id))
        return row

    async def commit(
        self,
        run_id: str,
        token: uuid.UUID,
        *,
        status: str,
        new_token: uuid.UUID | None = None,
        due_in: timedelta | None = None,
        due_at: datetime | None = None,
        output: str | None = None,
        error: dict[str, Any] | None = None,
        step_key: str | None = None,
        step_attempt: int = 0,
        steps: Sequence[StepRecord] = (),
        events: Sequence[EventRecord] = (),
        keep_due: bool = False,
        flow: bool = False,
        conn: asyncpg.Connection | None = None,
    ) -> datetime | bool | None:
        """Write under the lease.  Returns False if the lease was lost, else the new due_at.

        ``keep_due`` leaves due_at (the lease expiry) as it is: a mid-run flush.
        ``flow``: the run holds concurrency slots, which a write that ends the
        invocation (not ``keep_due``) releases, so a group commit batch with it
        and another such write takes their keys first.
        ``conn``: write on this connection, inside its open transaction
        (ctx.transaction records its step with the user's own writes).
        """
        run_uuid = uuid.UUID(run_id)
        outputs = _stored_outputs(steps, self.sealer)
        staged = [0] * len(steps)
        for i, (step, stored) in enumerate(zip(steps, outputs, strict=True)):
            if stored is not None and len(stored) > STAGE_ABOVE:
                staged[i] = await self._stage(run_uuid, token, step.key, stored)
        head = (
            run_uuid,
            token,
            status,
            new_token,
            due_in,
            due_at,
            self.sealer.seal_json(output),
            display_json(self.sealer.seal_error(error)) if error is not None else None,
            step_key,
            step_attempt,
            *_step_columns(steps, outputs, staged, self.sealer),
        )
        if events or any(staged) or not self.lean_commit:
            query, args = "commit", (*head, *_event_columns(events, self.sealer), keep_due, staged)
        else:  # the common case (sql/queries.sql: commit_lean)
            query, args = "commit_lean", (*head, keep_due)
        try:
            if conn is not None:  # a transaction step: the user's transaction
                row = await self._call("fetchrow", query, *args, conn=conn)
            elif flow and not keep_due:  # ends the invocation: releases its slots
                self._flow_writes[run_uuid] = self._flow_writes.get(run_uuid, 0) + 1
                try:
                    row = await self._write(query, *args)
                finally:
                    left = self._flow_writes.pop(run_uuid) - 1
                    if left:
                        self._flow_writes[run_uuid] = left
            else:
                row = await self._write(query, *args)
        finally:
            if any(staged):
                try:
                    await self._call("execute", "clear_staged", run_uuid)
                except Exception as exc:  # the next large commit of this run clears them
                    logger.debug("could not clear staged chunks of run %s: %s", run_id, exc)
        if row is None:
            return False
        due: datetime | None = row["due_at"]
        return due

    async def _stage(self, run_id: uuid.UUID, token: uuid.UUID, key: str, text: str | bytes) -> int:
        """Send a large output ahead, a chunk (bytes) per statement; returns how many."""
        count = 0
        for count, start in enumerate(range(0, len(text), CHUNK), start=1):
            piece = text[start : start + CHUNK]
            data = piece.encode() if isinstance(piece, str) else piece
            await self._call("execute", "stage_chunk", run_id, key, token, count, data)
        return count

    async def heartbeat(self, run_id: str, token: uuid.UUID, lease: timedelta) -> str | None:
        """Extend the lease; the run's status while it is held, None once it is lost."""
        row = await self._call("fetchrow", "heartbeat", uuid.UUID(run_id), token, lease)
        return None if row is None else str(row["status"])

    async def release_stopped(self, run_id: str, token: uuid.UUID, detail: dict[str, Any]) -> bool:
        """Let go of a run cancelled under this lease, once its step has really ended."""
        row = await self._call(
            "fetchrow", "release_stopped", uuid.UUID(run_id), token, display_json(detail)
        )
        return row is not None

    async def cancel(self, run_id: str, detail: dict[str, Any]) -> tuple[bool, str | None]:
        row = await self._call("fetchrow", "cancel_run", uuid.UUID(run_id), display_json(detail))
        return bool(row["cancelled"]), row["previous_status"]

    # scheduler ----------------------------------------------------------------
    async def claim_due(self, limit: int, lease: timedelta) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._call("fetch", "claim_due", limit, lease)
        return rows

    async def dispatch_failed(self, failures: Sequence[tuple[str, uuid.UUID, float, str]]) -> None:
        """Back off runs whose invocation failed: (run id, token, delay in s, reason)."""
        if not failures:
            return
        ids, tokens, delays, reasons = zip(*failures, strict=True)
        await self._call(
            "execute",
            "dispatch_failed",
            [uuid.UUID(i) for i in ids],
            list(tokens),
            list(delays),
            list(reasons),
        )

    async def release_claims(self, claims: Sequence[tuple[str, uuid.UUID]]) -> None:
        """Make runs claimed by a tick but never sent due again at once."""
        if not claims:
            return
        await self._call(
            "execute",
            "release_claims",
            [uuid.UUID(run_id) for run_id, _ in claims],
            [token for _, token in claims],
        )

    async def next_due(self) -> tuple[float | None, float]:
        """(next due time or None if no run is live, clock now), as unix seconds."""
        row = await self._call("fetchrow", "next_due")
        return row["due"], row["now"]

    async def debounce_run(
        self,
        *,
        run_id: str,
        workflow: str,
        input_json: str,
        debounce_key: str,
        period: timedelta,
        flow: Any,
        priority: int,
        timeout: timedelta | None,
        start_timeout: timedelta | None,
        conn: asyncpg.Connection | None = None,
    ) -> tuple[str, bool]:
        """Merge a trigger into the key's pending run, or create it (flowcontrol.Debounce)."""
        if conn is not None and not self._ready:
            await self.ensure_schema()
        row = await self._call(
            "fetchrow",
            "debounce_run",
            uuid.UUID(run_id),
            workflow,
            input_json,
            debounce_key,
            period,
            flow.keys,
            flow.limits,
            priority,
            timeout,
            start_timeout,
            flow.rate_keys,
            flow.rate_spacing,
            conn=conn,
        )
        return str(row["id"]), bool(row["created"])

    async def step_rate_take(
        self,
        run_id: uuid.UUID,
        step_key: str,
        attempt: int,
        rate_key: str,
        spacing: timedelta,
        horizon: timedelta,
    ) -> asyncpg.Record:
        """A rate-limited step attempt's start time (flowkeeper.steprates).

        The row: slot, fresh, kept, exchanged, now.
        """
        row: asyncpg.Record = await self._call(
            "fetchrow", "step_rate_take", run_id, step_key, attempt, rate_key, spacing, horizon
        )
        return row

    async def step_rate_retake(
        self,
        run_id: uuid.UUID,
        step_key: str,
        attempt: int,
        rate_key: str,
        spacing: timedelta,
        horizon: timedelta,
        late: datetime,
        exchanged: bool,
    ) -> asyncpg.Record:
        """A new time for a ticket used late (flowkeeper.steprates); the row as
        :meth:`step_rate_take`'s."""
        row: asyncpg.Record = await self._call(
            "fetchrow",
            "step_rate_retake",
            run_id,
            step_key,
            attempt,
            rate_key,
            spacing,
            horizon,
            late,
            exchanged,
        )
        return row

    async def flow_sweep(self, max_keys: int = 200) -> int:
        """Wake parked runs of keys with free slots (flowkeeper.flowcontrol's safety net)."""
        return int(await self._call("fetchval", "flow_sweep", max_keys) or 0)

    # reading ------------------------------------------------------------------
    async def run_input_text(
        self, run_id: str, *, conn: asyncpg.Connection | None = None
    ) -> str | None:
        """The run's input as stored (exact JSON text), or None without such a run."""
        value: str | None = await self._call(
            "fetchval", "run_input_text", uuid.UUID(run_id), conn=conn
        )
        return self.sealer.open_json(value)

    async def run_ids_like(self, low: uuid.UUID, high: uuid.UUID, pattern: str) -> list[str]:
        """Up to three run ids in [low, high] matching the LIKE ``pattern`` (short ids)."""
        rows = await self._call("fetch", "run_ids_like", low, high, pattern)
        return [str(r["id"]) for r in rows]

    async def run_status(self, run_id: str) -> dict[str, Any] | None:
        row: asyncpg.Record | None = await self._call("fetchrow", "run_status", uuid.UUID(run_id))
        return None if row is None else _opened(row, self.sealer, ("output",), ("error",))

    async def get_run(
        self, run_id: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]] | None:
        """The run, its steps and its events, sealed payloads opened (flowkeeper.codec)."""
        rid = uuid.UUID(run_id)
        run = await self._call("fetchrow", "get_run", rid)
        if run is None:
            return None
        steps = await self._call("fetch", "get_steps", rid)
        events = await self._call("fetch", "get_events", rid)
        opened = self.sealer
        return (
            _opened(run, opened, ("input", "output"), ("error",)),
            [
                _wait_opened(_opened(s, opened, ("input", "output"), ("error",)), opened)
                for s in steps
            ],
            [_opened(e, opened, (), ("detail",)) for e in events],
        )

    async def clock_now(self) -> datetime:
        now: datetime = await self._call("fetchval", "clock_now")
        return now

    # dashboard: runs list, replay and retry, alerts, login throttling ---------------
    async def list_run_ids(
        self,
        low: uuid.UUID,
        high: uuid.UUID,
        limit: int,
        *,
        workflow: str | None,
        status: str | None,
        search: tuple[uuid.UUID | None, str | None] | None,
    ) -> list[uuid.UUID]:
        """Run ids in [low, high), newest first, with one query per filter shape."""
        if search is not None:
            rows = await self._call(
                "fetch", "search_run_ids", low, high, limit, search[0], search[1]
            )
        elif workflow is not None and status is not None:
            rows = await self._call(
                "fetch", "list_run_ids_by_workflow_status", low, high, limit, workflow, status
            )
        elif workflow is not None:
            rows = await self._call("fetch", "list_run_ids_by_workflow", low, high, limit, workflow)
        elif status is not None:
            rows = await self._call("fetch", "list_run_ids_by_status", low, high, limit, status)
        else:
            rows = await self._call("fetch", "list_run_ids", low, high, limit)
        return [r["id"] for r in rows]

    async def run_summaries(self, ids: Sequence[uuid.UUID]) -> list[dict[str, Any]]:
        if not ids:
            return []
        rows: list[asyncpg.Record] = await self._call("fetch", "run_summaries", list(ids))
        out = [dict(r) for r in rows]
        for row in out:
            try:
                row["error_message"] = self.sealer.open_text(row["error_message"])
            except DecryptionError:  # cut short by the list query: the run page shows it
                row["error_message"] = "[encrypted message: open the run to read it]"
        return out

    async def count_runs(
        self, low: uuid.UUID, high: uuid.UUID, *, workflow: str | None
    ) -> dict[str, int]:
        if workflow is None:
            rows = await self._call("fetch", "count_runs_by_status", low, high)
        else:
            rows = await self._call("fetch", "count_workflow_runs_by_status", low, high, workflow)
        return {r["status"]: r["n"] for r in rows}

    async def list_workflows(self) -> list[str]:
        rows = await self._call("fetch", "list_workflows")
        return [r["workflow"] for r in rows]

    async def run_version(self, run_id: str) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self._call("fetchrow", "run_version", uuid.UUID(run_id))
        return row

    async def replay(
        self,
        run_id: str,
        position: int,
        *,
        kind: str,
        step_key: str | None,
        detail: dict[str, Any],
        lease_token: uuid.UUID | None,
        lease: timedelta,
    ) -> tuple[bool, int]:
        """Reset a finished run to run again from ``position``; (replayed, steps forgotten)."""
        row = await self._call(
            "fetchrow",
            "replay_run",
            uuid.UUID(run_id),
            position,
            kind,
            lease_token,
            lease,
            display_json(self.sealer.seal_error(detail)),
            step_key,
        )
        return bool(row["replayed"]), int(row["forgotten"])

    async def retry_now(
        self,
        run_id: str,
        *,
        detail: dict[str, Any],
        lease_token: uuid.UUID | None,
        lease: timedelta,
    ) -> bool:
        row = await self._call(
            "fetchrow", "retry_now", uuid.UUID(run_id), lease_token, lease, display_json(detail)
        )
        return bool(row["retried"])

    async def failed_run_ids(
        self, workflow: str, low: uuid.UUID, high: uuid.UUID, limit: int
    ) -> list[str]:
        rows = await self._call("fetch", "failed_run_ids", workflow, low, high, limit)
        return [str(r["id"]) for r in rows]

    async def claim_alerts(
        self, limit: int, lease: timedelta, run_id: str | None = None
    ) -> list[Any]:
        rid = uuid.UUID(run_id) if run_id is not None else None
        rows: list[asyncpg.Record] = await self._call("fetch", "claim_alerts", limit, lease, rid)
        if not self.sealer.on:
            return rows
        return [self._alert_opened(r) for r in rows]

    def _alert_opened(self, row: asyncpg.Record) -> dict[str, Any]:
        """An alert's run, opened; what this process cannot decrypt is said, not raised.

        An alert is most needed for the run whose key was dropped (it failed
        with DecryptionError): one unreadable row must not hold up the rest.
        """
        try:
            return _opened(row, self.sealer, ("input",), ("error",))
        except DecryptionError as exc:
            out = dict(row)
            out["input"] = json.dumps(f"<not readable here: {exc}>")
            try:
                out["error"] = _opened(row, self.sealer, (), ("error",))["error"]
            except DecryptionError:
                out["error"] = display_json({"type": "DecryptionError", "message": str(exc)})
            return out

    async def alert_result(
        self,
        alert_id: int,
        *,
        done: Sequence[str],
        outcome: str | None,
        retry_in: timedelta | None,
        error: str | None,
        event: str | None,
        detail: dict[str, Any] | None,
    ) -> None:
        await self._call(
            "execute",
            "alert_result",
            alert_id,
            list(done),
            outcome,
            retry_in,
            error,
            event,
            display_json(detail) if detail is not None else None,
        )

    async def login_failures(self, client: str, window: timedelta) -> int:
        value = await self._call("fetchval", "login_failures", client, window)
        return int(value or 0)

    async def login_succeeded(self, client: str) -> None:
        await self._call("execute", "login_succeeded", client)

    async def login_attempt(self, client: str, window: timedelta) -> int:
        """Count a sign-in attempt; the attempts within ``window``, this one included."""
        return int(await self._call("fetchval", "login_attempt", client, window))

    async def session_start(self, digest: bytes, ttl: timedelta) -> None:
        await self._call("execute", "session_start", digest, ttl)

    async def session_valid(self, digest: bytes) -> bool:
        return bool(await self._call("fetchval", "session_valid", digest))

    async def session_end(self, digest: bytes) -> None:
        await self._call("execute", "session_end", digest)

    # rolling deploys: runs whose workflow the endpoint does not know (sql/deploys.sql) --------
    async def unknown_workflow_episode(
        self, run_id: str
    ) -> tuple[datetime, int | None, dict[str, Any] | None]:
        """(clock now, the run's latest ``workflow_unknown`` event id and detail, or Nones)."""
        row = await self._call("fetchrow", "unknown_workflow_episode", uuid.UUID(run_id))
        detail = json.loads(row["detail"]) if row["detail"] else None
        return row["now"], row["event_id"], detail

    async def defer_unknown_workflow(
        self,
        run_id: str,
        token: uuid.UUID,
        *,
        status: str,
        delay: float,
        detail: dict[str, Any],
        event_id: int | None,
        not_after: datetime,
    ) -> datetime | None:
        """Release the run, due again in ``delay`` s (at the latest ``not_after``); record
        the deferral (a new event when ``event_id`` is None, else an update of that one).
        None when the lease was lost."""
        row = await self._call(
            "fetchrow",
            "defer_unknown_workflow",
            uuid.UUID(run_id),
            token,
            status,
            delay,
            json.dumps(detail),
            event_id,
            not_after,
        )
        if row is None:
            return None
        due: datetime = row["due_at"]
        return due

    # events, waits and approval tokens (sql/events.sql) ------------------------------------
    async def register_wait(
        self,
        run_id: str,
        token: uuid.UUID,
        *,
        key: str,
        position: int,
        name: str,
        kind: str,
        event: str | None,
        paths: Sequence[str],
        values: Sequence[Any],
        match: dict[str, Any] | None,
        containment: dict[str, Any],
        token_id: str | None,
        lookback: datetime | None,
        expires: datetime | None,
        started: datetime,
    ) -> tuple[str, str | None, datetime | None]:
        """Record a wait; ('resolved', payload) at once, ('waiting', due) or ('lost', None).

        The payload is as stored: sealed under a codec (the engine opens it).
        """
        paths, values, containment = self.sealer.wait_index(paths, values, containment)
        row = await self._call(
            "fetchrow",
            "register_wait",
            uuid.UUID(run_id),
            token,
            key,
            position,
            name,
            kind,
            event,
            paths,
            json.dumps(values),
            self.sealer.seal_json(json.dumps(match)) if match is not None else None,
            json.dumps(containment),
            token_id,
            lookback,
            expires,
            started,
        )
        return str(row["outcome"]), row["payload"], row["due_at"]

    # children (sql/children.sql, migration 0010) ---------------------------------------
    async def start_child(
        self,
        parent_id: str,
        token: uuid.UUID,
        *,
        child_id: str,
        workflow: str,
        input_json: str,
        step_key: str,
        cancel_with_parent: bool,
        limit: int,
        push_token: uuid.UUID | None,
        lease: timedelta,
    ) -> tuple[str, bool, uuid.UUID | None] | None:
        """Start a child once per (parent, step); None when the parent's lease is lost."""
        row = await self._call(
            "fetchrow",
            "start_child",
            uuid.UUID(parent_id),
            token,
            uuid.UUID(child_id),
            workflow,
            input_json,
            step_key,
            cancel_with_parent,
            limit,
            push_token,
            lease,
        )
        if row is None:
            return None
        return str(row["child_id"]), bool(row["created"]), row["push_token"]

    async def wait_children(
        self,
        run_id: str,
        token: uuid.UUID,
        *,
        key: str,
        position: int,
        name: str,
        child_ids: Sequence[str],
        expires: datetime | None,
        started: datetime,
        time_up: bool,
        suspend: bool = True,
    ) -> str:
        """'lost' | 'resolved' | 'timed_out' | 'waiting' (suspended) | 'pending' (not asked to)."""
        return str(
            await self._call(
                "fetchval",
                "wait_children",
                uuid.UUID(run_id),
                token,
                key,
                position,
                name,
                [uuid.UUID(c) for c in child_ids],
                expires,
                started,
                time_up,
                suspend,
            )
        )

    async def suspend_for_children(
        self, run_id: str, token: uuid.UUID, keys: Sequence[str], due: datetime | None
    ) -> list[str] | None:
        """Suspend unless one of the waits ``keys`` is resolved (those keys); None: lost."""
        done = await self._call(
            "fetchval", "suspend_for_children", uuid.UUID(run_id), token, list(keys), due
        )
        return None if done is None else [str(k) for k in done]

    async def children_results(self, child_ids: Sequence[str]) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._call(
            "fetch", "children_results", [uuid.UUID(c) for c in child_ids]
        )
        return rows

    async def wake_parent(self, child_id: str, token: uuid.UUID, lease: timedelta) -> str | None:
        """Lease the child's parent to a push when the child's end made it due."""
        row = await self._call("fetchrow", "wake_parent", uuid.UUID(child_id), token, lease)
        return None if row is None else str(row["id"])

    async def run_children(self, run_id: str, limit: int = 1000) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._call(
            "fetch", "run_children", uuid.UUID(run_id), limit
        )
        return rows

    async def count_children(self, run_id: str) -> int:
        return int(await self._call("fetchval", "count_children", uuid.UUID(run_id)))

    async def run_parent(self, run_id: str) -> tuple[str, str | None] | None:
        row = await self._call("fetchrow", "run_parent", uuid.UUID(run_id))
        if row is None or row["parent_id"] is None:
            return None
        return str(row["parent_id"]), row["parent_step"]

    async def resume_wait(
        self, run_id: str, token: uuid.UUID, key: str, *, time_up: bool
    ) -> tuple[str, str | None]:
        """A recorded wait's state under the send/complete locks (see sql/events.sql)."""
        row = await self._call("fetchrow", "resume_wait", uuid.UUID(run_id), token, key, time_up)
        return str(row["status"]), row["payload"]

    async def send_event(
        self,
        conn: asyncpg.Connection,
        name: str,
        key: str | None,
        payload: str,
        run_id: str | None,
        lease: timedelta | None,
    ) -> list[asyncpg.Record]:
        if not self._ready:
            await self.ensure_schema()
        rows: list[asyncpg.Record] = await self._call(
            "fetch",
            "send_event",
            name,
            key,
            self.sealer.seal_json(payload),
            uuid.UUID(run_id) if run_id else None,
            lease,
            self.sealer.event_index(payload),  # hashed before the payload is sealed
            conn=conn,
        )
        return rows

    async def event_started(
        self, conn: asyncpg.Connection, event_id: int, run_ids: Sequence[str]
    ) -> None:
        await self._call(
            "execute", "event_started", event_id, [uuid.UUID(r) for r in run_ids], conn=conn
        )

    async def create_token(
        self, token_id: str, run_id: str, name: str, expires: datetime | None
    ) -> None:
        await self._call("execute", "create_token", token_id, uuid.UUID(run_id), name, expires)

    async def complete_token(
        self, token_id: str, payload: str, lease: timedelta | None
    ) -> tuple[str, str | None, uuid.UUID | None]:
        """('completed' | 'already_completed' | 'expired' | 'not_found', run id, push token)."""
        row = await self._call(
            "fetchrow", "complete_token", token_id, self.sealer.seal_json(payload), lease
        )
        rid = str(row["run_id"]) if row["run_id"] is not None else None
        return str(row["outcome"]), rid, row["lease"]

    async def list_events(
        self, *, before: int | None, limit: int, name: str | None, key: str | None
    ) -> list[dict[str, Any]]:
        rows = await self._call("fetch", "list_events", before, limit, name, key)
        return [_shown(r, self.sealer, "payload") for r in rows]

    async def get_event(self, event_id: int) -> dict[str, Any] | None:
        row = await self._call("fetchrow", "get_event", event_id)
        return None if row is None else _shown(row, self.sealer, "payload")

    async def event_effects(self, event_id: int) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._call("fetch", "event_effects", event_id)
        return rows

    async def run_waits(self, run_id: str) -> list[dict[str, Any]]:
        rows = await self._call("fetch", "run_waits", uuid.UUID(run_id))
        return [_shown(r, self.sealer, "match") for r in rows]

    async def prune_events(self, older_than: timedelta, limit: int = 1000) -> int:
        """Delete events no live run can still match; how many went."""
        status = await self._call("execute", "prune_events", older_than, limit)
        await self._call("execute", "prune_waits", limit)
        return int(str(status).rsplit(" ", 1)[-1] or 0)

    async def register_cancel_rule(
        self,
        run_id: str,
        token: uuid.UUID,
        *,
        key: str,
        event: str,
        paths: Sequence[str],
        values: Sequence[Any],
        match: dict[str, Any],
        containment: dict[str, Any],
        since: datetime,
    ) -> str:
        """'registered' | 'exists' | 'cancelled' (an earlier event matched) | 'lost'."""
        paths, values, containment = self.sealer.wait_index(paths, values, containment)
        outcome: str = await self._call(
            "fetchval",
            "register_cancel_rule",
            uuid.UUID(run_id),
            token,
            key,
            event,
            paths,
            json.dumps(values),
            self.sealer.seal_json(json.dumps(match, default=str)),
            json.dumps(containment),
            since,
        )
        return outcome

    # a run's stream of messages (sql/streams.sql) -------------------------------------------
    async def stream_count(self, run_id: str) -> int:
        return int(await self._call("fetchval", "stream_count", uuid.UUID(run_id)))

    async def stream_append(
        self, run_id: str, messages: Sequence[tuple[str, str | None, int | None, str]]
    ) -> int | None:
        """Append (topic, step key, attempt, data JSON) messages; the last one's cursor."""
        if not messages:
            return None
        topics, keys, attempts, data = (list(c) for c in zip(*messages, strict=True))
        if self.sealer.on:
            data = [self.sealer.seal_json(d) for d in data]
        row = await self._call(
            "fetchrow", "stream_append", uuid.UUID(run_id), topics, keys, attempts, data
        )
        last: int | None = row["last"]
        return last

    async def stream_read(
        self, run_id: str, after: int, topic: str | None, limit: int
    ) -> list[dict[str, Any]]:
        rows = await self._call("fetch", "stream_read", uuid.UUID(run_id), after, topic, limit)
        return [_shown(r, self.sealer, "data") for r in rows]

    async def stream_run_status(self, run_id: str) -> str | None:
        status: str | None = await self._call("fetchval", "stream_run_status", uuid.UUID(run_id))
        return status

    # versioning: live runs per patch branch (sql/patches.sql) --------------------------------
    async def patch_counts(self) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._call("fetch", "patch_counts")
        return rows

    async def patch_unreached(self, key: str, workflows: Sequence[str]) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._call(
            "fetch", "patch_unreached", key, list(workflows)
        )
        return rows

    async def patch_runs(self, key: str, new_branch: bool, limit: int) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._call("fetch", "patch_runs", key, new_branch, limit)
        return rows

    # fk.fork: a new run from another's history (sql/fork.sql) -------------------------------
    async def fork_run(
        self,
        new_id: str,
        source_id: str,
        position: int,
        *,
        detail: dict[str, Any],
        lease_token: uuid.UUID | None,
        lease: timedelta,
        code_version: str | None,
    ) -> tuple[str | None, int]:
        """Create run ``new_id`` with the source's input and its steps before ``position``."""
        row = await self._call(
            "fetchrow",
            "fork_run",
            uuid.UUID(new_id),
            uuid.UUID(source_id),
            position,
            lease_token,
            lease,
            display_json(detail),
            code_version,
        )
        rid = str(row["id"]) if row["id"] is not None else None
        return rid, int(row["copied"])

    # observability (sql/steplogs.sql, sql/health.sql) -----------------------------------------
    async def step_logs_append(
        self,
        run_id: str,
        rows: Sequence[tuple[str | None, int | None, int, str, str, datetime]],
        run_bytes: int,
    ) -> None:
        """Append captured log lines (step key, attempt, level, logger, message, at)."""
        if not rows:
            return
        cols = [list(c) for c in zip(*rows, strict=True)]
        if self.sealer.on:  # the run's byte cap then counts sealed bytes
            cols[4] = [self.sealer.seal_text(m) for m in cols[4]]
        await self._call("execute", "step_logs_append", uuid.UUID(run_id), *cols, run_bytes)

    async def step_logs_read(self, run_id: str, limit: int) -> list[dict[str, Any]]:
        rows = await self._call("fetch", "step_logs_read", uuid.UUID(run_id), limit)
        out = []
        for row in rows:
            line = dict(row)
            try:
                line["message"] = self.sealer.open_text(line["message"])
            except DecryptionError as exc:
                line["message"] = f"(sealed, cannot be opened here: {exc})"
            out.append(line)
        return out

    async def step_logs_version(self, run_id: str) -> int:
        return int(await self._call("fetchval", "step_logs_version", uuid.UUID(run_id)))

    async def driver_ticked(
        self, kind: str, place: str, claimed: int, failed: int, last_error: str | None
    ) -> None:
        await self._call("execute", "driver_ticked", kind, place, claimed, failed, last_error)

    async def driver_list(self) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._call("fetch", "driver_list")
        return rows

    async def backlog(self, overdue_after: float) -> asyncpg.Record:
        row: asyncpg.Record = await self._call("fetchrow", "backlog", float(overdue_after))
        return row

    async def runs_by_status(self) -> dict[str, int]:
        rows = await self._call("fetch", "runs_by_status")
        return {r["status"]: int(r["n"]) for r in rows}

    async def run_trace_put(
        self, run_id: str, carrier: str, *, conn: asyncpg.Connection | None = None
    ) -> None:
        await self._call("execute", "run_trace_put", uuid.UUID(run_id), carrier, conn=conn)

    async def run_trace_get(self, run_id: str) -> str | None:
        value: str | None = await self._call("fetchval", "run_trace_get", uuid.UUID(run_id))
        return value

    async def driver_prune(self) -> None:
        await self._call("execute", "driver_prune")

    async def pgcron_last_tick(self) -> asyncpg.Record | None:
        """pg_cron's last tick (from its settings row), or None when not installed or idle."""
        if not await self._call("fetchval", "pgcron_installed"):
            return None
        row: asyncpg.Record | None = await self._call("fetchrow", "pgcron_last_tick")
        return row

    async def run_event_add(
        self, run_id: str, kind: str, step_key: str | None, attempt: int | None, detail: str
    ) -> None:
        await self._call(
            "execute", "run_event_add", uuid.UUID(run_id), kind, step_key, attempt, detail
        )
