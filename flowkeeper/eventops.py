"""Events and tokens from application code: send, complete, list (a FlowKeeper mixin).

Also what the dashboard and the CLI read about them: a page of events
(:meth:`EventOperations.event_page`), one event with the runs it woke,
started or cancelled (:meth:`EventOperations.get_event`), and what a run
waits or waited for (:meth:`EventOperations.run_waits`).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .errors import (
    EventNotFoundError,
    InvalidEventError,
    SerializationError,
    TokenCompletedError,
    TokenExpiredError,
    TokenNotFoundError,
)
from .eventlist import EventFilter, EventPage, parse_event_number
from .ids import check_run_id
from .serialization import dumps, json_or_none

if TYPE_CHECKING:
    import asyncpg

    from .dispatch import Dispatcher
    from .events import EventBus, SentEvent
    from .store import Store
    from .tokens import TokenSigner

logger = logging.getLogger("flowkeeper")


@dataclass(frozen=True, slots=True)
class EventInfo:
    """An event as stored, with what it did."""

    id: int
    name: str
    event_id: str | None  # the sender's dedup id
    data: Any
    sent_at: datetime
    sent_by_run: str | None
    started: list[str]  # runs of on_event workflows it started
    woke: int = 0
    cancelled: int = 0
    effects: list[dict[str, Any]] | None = None  # per run: woken/cancelled, at which wait


@dataclass(frozen=True, slots=True)
class WaitInfo:
    """What a run waits or waited for: a ``ctx.wait_for_event``, a
    ``ctx.wait_for_token`` (``kind`` ``"event"`` / ``"token"``, keyed like the
    history entry) or one of its workflow's ``cancel_on`` rules (``"cancel"``)."""

    key: str
    kind: str  # "event" | "token" | "cancel"
    event: str | None  # the event name (event waits and cancel_on rules)
    match: dict[str, Any] | None  # as the workflow gave it
    token_name: str | None  # the approval token's name (token waits)
    timeout_at: datetime | None
    started_at: datetime
    resolved_at: datetime | None
    #: None while it waits; "event" | "token" (resolved), "timed_out", "cancelled"
    #: (the run was cancelled, by this rule's event or otherwise).
    outcome: str | None
    event_number: int | None  # the event that resolved it (or cancelled the run)

    @property
    def state(self) -> str:
        """``waiting``, ``completed``, ``timed_out``, ``cancelled`` or ``ended``
        (the run ended while it waited: nothing can resolve it any more)."""
        if self.outcome in ("event", "token"):
            return "completed"
        if self.outcome is not None:
            return self.outcome
        return "waiting" if self.resolved_at is None else "ended"

    def describe(self) -> str:
        """In words: ``invoice.paid {order_id: 42}``, ``approval token refund``."""
        if self.kind == "token":
            return f"approval token {self.token_name or self.key}"
        what = f"{self.event} {match_text(self.match)}" if self.match else str(self.event)
        return f"cancel on {what}" if self.kind == "cancel" else what

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind,
            "event": self.event,
            "match": self.match,
            "token_name": self.token_name,
            "timeout_at": _iso(self.timeout_at),
            "started_at": _iso(self.started_at),
            "resolved_at": _iso(self.resolved_at),
            "outcome": self.outcome,
            "state": self.state,
            "event_number": self.event_number,
            "label": self.describe(),
        }


def match_text(match: dict[str, Any] | None) -> str:
    """A match as people write it: ``{order_id: 42, customer.tier: "gold"}``."""
    flat: list[str] = []

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                walk(path, value)
            else:
                flat.append(f"{path}: {json.dumps(value, ensure_ascii=False)}")

    walk("", match or {})
    return "{" + ", ".join(flat) + "}"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


class EventOperations:
    """``send_event``, ``complete_token``, ``list_events`` (methods of FlowKeeper)."""

    store: Store
    events: EventBus
    tokens: TokenSigner
    dispatcher: Dispatcher | None
    dispatch_lease: timedelta
    event_retention: timedelta

    if TYPE_CHECKING:

        async def _push(self, run_id: str, token: uuid.UUID) -> None: ...

    async def send_event(
        self,
        name: str,
        data: Any = None,
        *,
        id: str | None = None,
        connection: asyncpg.Connection | None = None,
    ) -> SentEvent:
        """Send an event: store it and act on everything waiting for it, in one transaction.

        Wakes every run whose ``ctx.wait_for_event`` it matches (each pushed to
        the endpoint at once; one that cannot be pushed is due for the
        scheduler), starts a run of each workflow declared ``on_event=name``,
        and cancels the runs whose ``cancel_on`` rules it matches.  ``id`` is a
        dedup id: a second event with the same id does nothing, and says so
        (``duplicate=True``).  With ``connection=`` (an asyncpg connection in a
        transaction) all of it happens in that transaction: the event exists,
        and wakes anyone, if and only if it commits.
        """
        return await self.events.send(name, data, id=id, connection=connection)

    async def complete_token(self, token_id: str, data: Any = None) -> str:
        """Complete an approval token (its signed ``token.id``) with ``data``; the run id.

        Raises :class:`TokenNotFoundError` (no such token, or not signed by this
        app), :class:`TokenCompletedError` (completed already: a token completes
        once) or :class:`TokenExpiredError` (its timeout is over).
        """
        raw = self.tokens.raw_id(token_id)
        if raw is None:
            raise TokenNotFoundError(
                str(token_id)[:80], "No such approval token: the id was not issued by this app."
            )
        try:
            payload = dumps(data, what="The data completing the token")
        except SerializationError as exc:
            raise InvalidEventError(str(exc)) from exc
        lease = self.dispatch_lease if self.dispatcher is not None else None
        outcome, run_id, push = await self.store.complete_token(raw, payload, lease)
        if outcome == "not_found":
            raise TokenNotFoundError(token_id, "No such approval token (it may have been pruned).")
        if outcome == "already_completed":
            raise TokenCompletedError(
                token_id, f"This approval token (run {run_id}) was completed already."
            )
        if outcome == "expired":
            raise TokenExpiredError(
                token_id, f"This approval token (run {run_id}) has expired; its wait timed out."
            )
        assert run_id is not None
        if push is not None:
            await self._push(run_id, push)
        return run_id

    async def list_events(
        self,
        *,
        name: str | None = None,
        event_id: str | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> list[EventInfo]:
        """Recent events, newest first (``before``: an event's number, for the next page)."""
        rows = await self.store.list_events(
            before=before, limit=max(1, min(limit, 500)), name=name, key=event_id
        )
        return [_event_info(r) for r in rows]

    async def event_page(self, filter: EventFilter | None = None, **criteria: Any) -> EventPage:
        """A page of events, newest first, and the cursor to the next one.

        ``filter`` is an :class:`~flowkeeper.eventlist.EventFilter`, or give its
        fields (``name=``, ``event_id=``, ``before=``, ``limit=``) as keywords.
        """
        f = filter or EventFilter.build(**criteria)
        rows = await self.store.list_events(
            before=f.before, limit=f.limit + 1, name=f.name, key=f.event_id
        )
        events = [_event_info(r) for r in rows[: f.limit]]
        more = len(rows) > f.limit
        return EventPage(
            events=events, next_before=events[-1].id if more else None, query=f.as_query()
        )

    async def get_event(self, number: int) -> EventInfo | None:
        """One event with the runs it woke, started or cancelled (None: no such event).

        ``effects`` has one entry per run: ``outcome`` ``"woke"`` (at wait
        ``wait``), ``"cancelled"`` (by its ``cancel_on`` rule ``wait``) or
        ``"started"`` (a run of a workflow declared ``on_event=`` its name),
        with the run's workflow and status now.
        """
        number = parse_event_number(number)
        row = await self.store.get_event(number)
        if row is None:
            return None
        effects = [
            {
                "run_id": str(e["run_id"]),
                "wait": e["key"],
                "outcome": "woke" if e["outcome"] == "event" else e["outcome"],
                "at": e["resolved_at"],
                "workflow": e["workflow"],
                "status": e["status"],
            }
            for e in await self.store.event_effects(number)
        ]
        info = _event_info(row)
        if info.started:
            started = await self.store.run_summaries([uuid.UUID(r) for r in info.started])
            effects += [
                {
                    "run_id": str(r["id"]),
                    "wait": None,
                    "outcome": "started",
                    "at": r["created_at"],
                    "workflow": r["workflow"],
                    "status": r["status"],
                }
                for r in sorted(started, key=lambda r: r["id"])
            ]
        return EventInfo(
            id=info.id,
            name=info.name,
            event_id=info.event_id,
            data=info.data,
            sent_at=info.sent_at,
            sent_by_run=info.sent_by_run,
            started=info.started,
            woke=sum(1 for e in effects if e["outcome"] == "woke"),
            cancelled=sum(1 for e in effects if e["outcome"] == "cancelled"),
            effects=effects,
        )

    async def require_event(self, number: int) -> EventInfo:
        """:meth:`get_event`, raising :class:`EventNotFoundError` when there is none."""
        info = await self.get_event(number)
        if info is None:
            raise EventNotFoundError(number)
        return info

    async def run_waits(self, run_id: str) -> list[WaitInfo]:
        """What run ``run_id`` waits or waited for, oldest first (its cancel_on rules too)."""
        rows = await self.store.run_waits(check_run_id(run_id))
        return [
            WaitInfo(
                key=r["key"],
                kind=r["kind"],
                event=r["event_name"],
                match=json_or_none(r["match"]),
                token_name=r["token_name"],
                timeout_at=r["expires_at"],
                started_at=r["created_at"],
                resolved_at=r["resolved_at"],
                outcome=r["outcome"],
                event_number=r["resolved_event"],
            )
            for r in rows
        ]

    async def prune_events(self) -> int:
        """Delete events older than ``event_retention`` that no live run can still match."""
        return await self.store.prune_events(self.event_retention)


def _event_info(row: Any) -> EventInfo:
    keys = row.keys()
    return EventInfo(
        id=int(row["id"]),
        name=row["name"],
        event_id=row["event_key"],
        data=json_or_none(row["payload"]),
        sent_at=row["sent_at"],
        sent_by_run=str(row["sent_by_run"]) if row["sent_by_run"] else None,
        started=[str(r) for r in row["started"]],
        woke=int(row["woke"]) if "woke" in keys else 0,
        cancelled=int(row["cancelled"]) if "cancelled" in keys else 0,
    )
