"""The store: every query flowkeeper sends goes through here.

The engine, the scheduler and the endpoint speak to Postgres only through
these methods; the SQL itself lives in ``sql/queries.sql``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from . import migrations
from .db import Database
from .errors import DatabaseError, DatabaseRefusedError, MigrationError
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


@dataclass(frozen=True, slots=True)
class StepRecord:
    """A step or sleep the engine has not written yet."""

    key: str
    position: int
    name: str
    kind: str
    status: str
    input: str | None
    output: str | None
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


def _step_columns(steps: Sequence[StepRecord]) -> list[list[Any]]:
    """The commit query takes one array per column (unnest): no JSON to build or parse."""
    return [
        [s.key for s in steps],
        [s.position for s in steps],
        [s.name for s in steps],
        [s.kind for s in steps],
        [s.status for s in steps],
        [s.input for s in steps],
        [s.output for s in steps],
        [s.output_type for s in steps],
        [display_json(s.error) if s.error is not None else None for s in steps],
        [s.attempts for s in steps],
        [s.started_at for s in steps],
        [s.finished_at for s in steps],
        [s.wake_at for s in steps],
    ]


def _event_columns(events: Sequence[EventRecord]) -> list[list[Any]]:
    return [
        [e.kind for e in events],
        [e.step_key for e in events],
        [e.attempt for e in events],
        [display_json(e.detail) if e.detail is not None else None for e in events],
    ]


def _claimed_run(row: Any, token: uuid.UUID, history: list[HistoryEntry]) -> ClaimedRun:
    """A claim query's row (create_claimed_run, claim_run) as the engine takes it."""
    return ClaimedRun(
        run_id=str(row["id"]),
        lease_token=token,
        workflow=row["workflow"],
        input=row["input"],
        step_key=row["step_key"],
        step_attempt=row["step_attempt"],
        invocations=row["invocations"],
        db_now=row["db_now"],
        history=history,
        lost_attempts=row["lost_attempts"],
        created_at=row["created_at"],
    )


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

    def __init__(self, db: Database, schema: str, *, auto_migrate: bool = True) -> None:
        self.db = db
        self.schema = schema
        self.q = load_queries(schema)
        self.auto_migrate = auto_migrate
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
            refused = _refused(name, exc)
            if refused is not None:
                raise refused from exc
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
            raise

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
                latest = migrations.latest_version()
                if version < latest:
                    if not self.auto_migrate:
                        raise MigrationError(
                            f"Schema {self.schema!r} is at version {version}, this flowkeeper "
                            f"needs {latest}. Run `flowkeeper migrate`."
                        )
                    await migrations.migrate(conn, self.schema)
                elif version > latest:
                    raise MigrationError(
                        f"Schema {self.schema!r} is at version {version}, newer than this "
                        f"flowkeeper ({latest}) knows. Upgrade flowkeeper in this deployment."
                    )
            self._ready = True

    async def migrate(self) -> list[int]:
        async with self.db.acquire() as conn:
            applied = await migrations.migrate(conn, self.schema)
        self._ready = True
        return applied

    # runs ---------------------------------------------------------------------
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
        row = await self._call(
            "fetchrow",
            "insert_run",
            uuid.UUID(run_id),
            workflow,
            input_json,
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
            conn=conn,
        )
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
    ) -> ClaimedRun | tuple[str, bool] | None:
        """:meth:`create_claimed` for a flow-controlled run: inserted, then claimed through
        the flow gate, in one transaction (one commit).  None: created but not claimed
        (parked on a key, throttled, ...); a tuple: as :meth:`create_claimed`'s conflict."""
        if not self._ready:
            await self.ensure_schema()
        token = uuid.uuid4()
        async with self.db.acquire() as conn, conn.transaction():
            created, _ = await self.insert_run(
                run_id=run_id,
                workflow=workflow,
                input_json=input_json,
                idempotency_key=idempotency_key,
                lease_token=token,
                lease=lease,
                conn=conn,
                flow_keys=flow.keys,
                flow_limits=flow.limits,
                priority=priority,
                timeout=timeout,
                start_timeout=start_timeout,
                rate_keys=flow.rate_keys,
                rate_spacing=flow.rate_spacing,
            )
            if created != run_id:
                return created, False
            return await self.claim(run_id, token, uuid.uuid4(), lease, conn=conn)

    async def create_claimed(
        self,
        *,
        run_id: str,
        workflow: str,
        input_json: str,
        idempotency_key: str | None,
        lease_token: uuid.UUID,
        lease: timedelta,
    ) -> ClaimedRun | tuple[str, bool]:
        """Create a run already leased to the caller (the endpoint), in one statement.

        On a conflict returns what :meth:`insert_run` would: the existing run's
        id and whether it is this run (created earlier under the same id).
        """
        row = await self._call(
            "fetchrow",
            "create_claimed_run",
            uuid.UUID(run_id),
            workflow,
            input_json,
            idempotency_key,
            lease_token,
            lease,
        )
        if row is None:
            return await self._existing(run_id, workflow, idempotency_key)
        return _claimed_run(row, lease_token, [])

    async def release_push(self, run_id: str, token: uuid.UUID) -> None:
        await self._call("execute", "release_push", uuid.UUID(run_id), token)

    async def claim(
        self,
        run_id: str,
        token: uuid.UUID | None,
        new_token: uuid.UUID,
        lease: timedelta,
        *,
        conn: asyncpg.Connection | None = None,
    ) -> ClaimedRun | None:
        row = await self._call(
            "fetchrow", "claim_run", uuid.UUID(run_id), token, new_token, lease, conn=conn
        )
        if row is None:
            return None
        history = [
            HistoryEntry(
                key=h["key"],
                position=h["position"],
                name=h["name"],
                kind=h["kind"],
                status=h["status"],
                output=h["output"],
                output_type=h["output_type"],
                error=h["error"],
                attempts=h["attempts"],
                wake_at=datetime.fromisoformat(h["wake_at"]) if h["wake_at"] else None,
            )
            for h in (json.loads(row["steps"]) if row["steps"] else [])
        ]
        return _claimed_run(row, new_token, history)

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
    ) -> datetime | bool | None:
        """Write under the lease.  Returns False if the lease was lost, else the new due_at.

        ``keep_due`` leaves due_at (the lease expiry) as it is: a mid-run flush.
        """
        row = await self._call(
            "fetchrow",
            "commit",
            uuid.UUID(run_id),
            token,
            status,
            new_token,
            due_in,
            due_at,
            output,
            display_json(error) if error is not None else None,
            step_key,
            step_attempt,
            *_step_columns(steps),
            *_event_columns(events),
            keep_due,
        )
        if row is None:
            return False
        due: datetime | None = row["due_at"]
        return due

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

    async def flow_sweep(self, max_keys: int = 200) -> int:
        """Wake parked runs of keys with free slots (flowkeeper.flowcontrol's safety net)."""
        return int(await self._call("fetchval", "flow_sweep", max_keys) or 0)

    # reading ------------------------------------------------------------------
    async def run_status(self, run_id: str) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self._call("fetchrow", "run_status", uuid.UUID(run_id))
        return row

    async def get_run(
        self, run_id: str
    ) -> tuple[asyncpg.Record, list[asyncpg.Record], list[asyncpg.Record]] | None:
        rid = uuid.UUID(run_id)
        run = await self._call("fetchrow", "get_run", rid)
        if run is None:
            return None
        steps = await self._call("fetch", "get_steps", rid)
        events = await self._call("fetch", "get_events", rid)
        return run, steps, events

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

    async def run_summaries(self, ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
        if not ids:
            return []
        rows: list[asyncpg.Record] = await self._call("fetch", "run_summaries", list(ids))
        return rows

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
            display_json(detail),
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
    ) -> list[asyncpg.Record]:
        rid = uuid.UUID(run_id) if run_id is not None else None
        rows: list[asyncpg.Record] = await self._call("fetch", "claim_alerts", limit, lease, rid)
        return rows

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
        """Record a wait; ('resolved', payload) at once, ('waiting', due) or ('lost', None)."""
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
            list(paths),
            json.dumps(list(values)),
            json.dumps(match) if match is not None else None,
            json.dumps(containment),
            token_id,
            lookback,
            expires,
            started,
        )
        return str(row["outcome"]), row["payload"], row["due_at"]

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
            payload,
            uuid.UUID(run_id) if run_id else None,
            lease,
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
        row = await self._call("fetchrow", "complete_token", token_id, payload, lease)
        rid = str(row["run_id"]) if row["run_id"] is not None else None
        return str(row["outcome"]), rid, row["lease"]

    async def list_events(
        self, *, before: int | None, limit: int, name: str | None, key: str | None
    ) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._call(
            "fetch", "list_events", before, limit, name, key
        )
        return rows

    async def get_event(self, event_id: int) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self._call("fetchrow", "get_event", event_id)
        return row

    async def event_effects(self, event_id: int) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._call("fetch", "event_effects", event_id)
        return rows

    async def run_waits(self, run_id: str) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._call("fetch", "run_waits", uuid.UUID(run_id))
        return rows

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
        outcome: str = await self._call(
            "fetchval",
            "register_cancel_rule",
            uuid.UUID(run_id),
            token,
            key,
            event,
            list(paths),
            json.dumps(list(values)),
            json.dumps(match, default=str),
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
        row = await self._call(
            "fetchrow", "stream_append", uuid.UUID(run_id), topics, keys, attempts, data
        )
        last: int | None = row["last"]
        return last

    async def stream_read(
        self, run_id: str, after: int, topic: str | None, limit: int
    ) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._call(
            "fetch", "stream_read", uuid.UUID(run_id), after, topic, limit
        )
        return rows

    async def stream_run_status(self, run_id: str) -> str | None:
        status: str | None = await self._call("fetchval", "stream_run_status", uuid.UUID(run_id))
        return status
