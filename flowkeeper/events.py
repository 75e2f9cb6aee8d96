"""Events: sending them, what a wait matches, and runs that events start or cancel.

An event is a name and JSON data, stored in ``event_log`` by
:meth:`EventBus.send` in one transaction with everything it causes: the waits
it satisfies are resolved and their runs made due (and pushed), the runs of
workflows declared ``on_event=`` its name are created (for a debounced one,
the key's pending run takes the event's data instead), and the runs whose
``cancel_on`` rules it matches are cancelled.  With ``connection=`` that
transaction is the caller's own: the event exists, and wakes anyone, if and
only if it commits.

A wait matches an event by name and by equality of fields of its data:
``match={"order_id": 42, "customer": {"tier": "gold"}}`` (or the dotted
``{"customer.tier": "gold"}``).  Its *shape* (the sorted field paths) and its
values are indexed, so a send probes one index entry per shape instead of
scanning the waiting runs.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pydantic

from .errors import InvalidEventError, StepUsageError
from .flowcontrol import FlowKeys, merge_debounced
from .ids import new_run_id
from .names import name_problem, shown
from .outbox import transaction_ended
from .serialization import dumps

if TYPE_CHECKING:
    import asyncpg

    from .store import Store
    from .workflow import Registry, Workflow

logger = logging.getLogger("flowkeeper")

MAX_EVENT_NAME = 200
MAX_EVENT_ID = 512
#: The prefix of a CancelOn match value that refers to the run's input.
INPUT_REF = "input."


def check_event_name(name: object, what: str = "event name") -> str:
    """A storable event name, or an InvalidEventError (a ValueError) saying what is wrong."""
    problem = name_problem(name, MAX_EVENT_NAME)
    if problem is not None:
        raise InvalidEventError(f"The {what} {shown(name)} {problem}.")
    assert isinstance(name, str)
    return name


@dataclass(frozen=True, slots=True)
class Match:
    """A wait's match, normalised: sorted dotted paths and the values there."""

    paths: list[str]
    values: list[Any]
    given: dict[str, Any]

    @property
    def containment(self) -> dict[str, Any]:
        """The match as a nested object, for jsonb ``@>`` (the lookback)."""
        nested: dict[str, Any] = {}
        for path, value in zip(self.paths, self.values, strict=True):
            node = nested
            *parents, last = path.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        return nested

    @classmethod
    def build(cls, match: Mapping[str, Any] | None, model: Any = None) -> Match:
        if match is None:
            return cls([], [], {})
        if not isinstance(match, Mapping):
            raise StepUsageError(f"match must be a dict of field -> value, got {match!r}")
        flat: dict[str, Any] = {}

        def walk(prefix: str, node: Mapping[Any, Any]) -> None:
            for key, value in node.items():
                if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
                    raise StepUsageError(
                        f"match field {key!r} is not a field name (use 'field' or "
                        "'parent.child', non-empty parts)"
                    )
                path = f"{prefix}.{key}" if prefix else key
                if isinstance(value, Mapping):
                    walk(path, value)
                    continue
                if value is None or not isinstance(value, str | int | float | bool):
                    raise StepUsageError(
                        f"match value of {path!r} must be a string, number or boolean, got "
                        f"{value!r} (lists, objects and None cannot be matched)"
                    )
                if isinstance(value, float) and not math.isfinite(value):
                    raise StepUsageError(f"match value of {path!r} must be finite, got {value}")
                if isinstance(value, str):
                    check_text(value, f"match value of {path!r}")
                if path in flat:
                    raise StepUsageError(f"match field {path!r} is given twice")
                flat[path] = value

        walk("", match)
        if model is not None:
            for path in flat:
                _check_model_path(model, path)
        paths = sorted(flat)
        return cls(paths, [flat[p] for p in paths], dict(match))

    def values_of(self, data: Any) -> list[Any]:
        """The values ``data`` has at this match's paths (what it is indexed by)."""
        out = []
        for path in self.paths:
            node = data
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            out.append(node)
        return out


def check_text(value: str, what: str) -> None:
    if "\x00" in value:
        raise StepUsageError(f"{what} contains a NUL character, which cannot be stored")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise StepUsageError(f"{what} contains a lone surrogate") from None


def _check_model_path(model: Any, path: str) -> None:
    """Refuse a match path that is not a field of the event's model (a typo)."""
    node = model
    walked: list[str] = []
    for part in path.split("."):
        fields = getattr(node, "model_fields", None)
        if not isinstance(fields, dict):
            return  # not a model here (a dict, Any): nothing to check against
        if part not in fields:
            where = ".".join(walked) or getattr(model, "__name__", "the model")
            known = ", ".join(sorted(fields)) or "none"
            raise StepUsageError(
                f"match field {path!r}: {part!r} is not a field of {where} (its fields: {known})"
            )
        walked.append(part)
        node = fields[part].annotation


@dataclass(frozen=True, slots=True)
class CancelOn:
    """Cancel a workflow's live runs when an event matching this arrives.

    ``match`` compares fields of the event's data with values; a value written
    ``"input.<path>"`` is the run's own input at that path, e.g.
    ``CancelOn("user.upgraded", match={"user_id": "input.user_id"})``.
    """

    event: str
    match: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_event_name(self.event)
        Match.build({k: (v if not _is_ref(v) else "x") for k, v in self.match.items()})

    def resolve(self, run_input: Any) -> Match:
        """The match for one run: input references replaced by that run's values."""
        concrete: dict[str, Any] = {}
        for key, value in self.match.items():
            if _is_ref(value):
                node = run_input
                for part in value[len(INPUT_REF) :].split("."):
                    if isinstance(node, pydantic.BaseModel):
                        node = getattr(node, part, None)
                    elif isinstance(node, dict):
                        node = node.get(part)
                    else:
                        node = None
                if node is None:
                    raise StepUsageError(
                        f"cancel_on {self.event!r}: the run's input has no value at "
                        f"{value[len(INPUT_REF) :]!r} to match {key!r} with"
                    )
                concrete[key] = node
            else:
                concrete[key] = value
        return Match.build(concrete)


def _is_ref(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(INPUT_REF)


@dataclass(frozen=True, slots=True)
class SentEvent:
    """What :meth:`FlowKeeper.send_event` did."""

    id: int
    duplicate: bool  # an event with this id had been sent already: nothing was done
    woken: list[str] = field(default_factory=list)  # runs whose wait it resolved
    #: Runs of on_event workflows it started; for a debounced workflow, the key's
    #: pending run, which took this event's data (created or merged into).
    started: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)  # runs a cancel_on rule matched


@dataclass(frozen=True, slots=True)
class _Start:
    """A run an event starts, its keys made before anything is written."""

    workflow: Workflow
    input_json: str
    flow: FlowKeys
    debounce_key: str | None


def _debounce_key(wf: Workflow, input_json: str) -> str | None:
    if wf.debounce is None:
        return None
    return wf.debounce.key_for(wf.name, wf.load_input(input_json))


Push = Callable[[str, uuid.UUID], Awaitable[None]]


class EventBus:
    """Sends events (see the module docstring); used by FlowKeeper and by ctx.send_event."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        *,
        push: Push | None,
        push_lease: timedelta,
        schedule: Callable[[Awaitable[None]], None],
        max_bytes: int = 1024 * 1024,
    ) -> None:
        self.store = store
        self.registry = registry
        self.push = push
        self.push_lease = push_lease
        self.schedule = schedule
        #: The sender's trace context, kept with the runs an event starts (flowkeeper.tracing).
        self.trace_carrier: Callable[[], dict[str, str] | None] = lambda: None
        self.max_bytes = max_bytes

    def listeners(self, name: str) -> list[Workflow]:
        return [wf for wf in self.registry.workflows() if wf.on_event == name]

    async def send(
        self,
        name: str,
        data: Any = None,
        *,
        id: str | None = None,
        connection: asyncpg.Connection | None = None,
        run_id: str | None = None,
    ) -> SentEvent:
        check_event_name(name)
        if id is not None:
            if not isinstance(id, str) or not id or len(id) > MAX_EVENT_ID:
                raise InvalidEventError(
                    f"An event id must be a non-empty string of at most {MAX_EVENT_ID} "
                    f"characters, got {id!r:.80}"
                )
            try:
                check_text(id, "The event id")
            except StepUsageError as exc:
                raise InvalidEventError(str(exc)) from None
        try:
            payload = dumps(data, what=f"The data of event {name!r}")
        except Exception as exc:
            raise InvalidEventError(str(exc)) from exc
        if len(payload) > self.max_bytes:
            raise InvalidEventError(
                f"The data of event {name!r} is {len(payload)} bytes of JSON; the limit is "
                f"{self.max_bytes}. Store large data elsewhere and send a reference."
            )
        listeners = self.listeners(name)
        texts = [(wf, wf.dump_input(data)) for wf in listeners]  # refused before anything
        # A concurrency or debounce key function that fails refuses the event.
        inputs = [_Start(wf, text, wf.flow(text), _debounce_key(wf, text)) for wf, text in texts]
        push = self.push is not None and connection is None
        lease = self.push_lease if self.push is not None else None
        if connection is not None:
            result, pushes = await self._send(connection, name, id, payload, run_id, lease, inputs)
            if pushes:
                self.schedule(self._push_after_commit(connection, pushes))
            return result
        # The schema is checked (once per process) before a connection is held:
        # checking it takes a pooled connection of its own, and sends holding
        # every connection of the pool while waiting for one more would hang.
        await self.store.ensure_schema()
        async with self.store.db.acquire() as conn, conn.transaction():
            result, pushes = await self._send(conn, name, id, payload, run_id, lease, inputs)
        if push:
            for rid, token in pushes:
                await self._push(rid, token)
        return result

    async def _send(
        self,
        conn: asyncpg.Connection,
        name: str,
        key: str | None,
        payload: str,
        run_id: str | None,
        lease: timedelta | None,
        inputs: list[_Start],
    ) -> tuple[SentEvent, list[tuple[str, uuid.UUID]]]:
        rows = await self.store.send_event(conn, name, key, payload, run_id, lease)
        head = rows[0]
        if head["kind"] == "duplicate":
            logger.info(
                "event %r with id %r was sent already (event %s)", name, key, head["event_id"]
            )
            return SentEvent(id=head["event_id"], duplicate=True), []
        event_id = int(head["event_id"])
        pushes: list[tuple[str, uuid.UUID]] = []
        woken: list[str] = []
        cancelled: list[str] = []
        for row in rows[1:]:
            rid = str(row["run_id"])
            if row["kind"] == "woken":
                woken.append(rid)
                if row["lease"] is not None:
                    pushes.append((rid, row["lease"]))
            else:
                cancelled.append(rid)
        started: list[str] = []
        carried = self.trace_carrier() if inputs else None
        for start in inputs:
            wf, input_json, flow = start.workflow, start.input_json, start.flow
            if start.debounce_key is not None:
                # The key's pending run takes this event's data and waits for quiet
                # (Debounce); the event's own id already made a resent event a duplicate.
                rid, created = await merge_debounced(
                    self.store, wf, input_json, start.debounce_key, flow, wf.priority, conn
                )
                started.append(rid)
                if created and carried:
                    await self.store.run_trace_put(rid, json.dumps(carried), conn=conn)
                continue
            token = uuid.uuid4() if lease is not None else None
            rid, created = await self.store.insert_run(
                run_id=new_run_id(),
                workflow=wf.name,
                input_json=input_json,
                idempotency_key=f"event:{key if key is not None else event_id}",
                lease_token=token,
                lease=lease or timedelta(0),
                conn=conn,
                code_version=wf.version,
                flow_keys=flow.keys,
                flow_limits=flow.limits,
                priority=wf.priority,
                timeout=wf.timeout,
                start_timeout=wf.start_timeout,
                rate_keys=flow.rate_keys,
                rate_spacing=flow.rate_spacing,
            )
            if created:
                started.append(rid)
                if carried:
                    await self.store.run_trace_put(rid, json.dumps(carried), conn=conn)
                if token is not None:
                    pushes.append((rid, token))
        if started:
            await self.store.event_started(conn, event_id, started)
        logger.debug(
            "event %r (%s): woke %d, started %d, cancelled %d",
            name,
            event_id,
            len(woken),
            len(started),
            len(cancelled),
        )
        return SentEvent(event_id, False, woken, started, cancelled), pushes

    async def _push(self, run_id: str, token: uuid.UUID) -> None:
        assert self.push is not None
        await self.push(run_id, token)

    async def _push_after_commit(
        self, connection: asyncpg.Connection, pushes: list[tuple[str, uuid.UUID]]
    ) -> None:
        """Outbox: push the woken runs once the caller's transaction is over."""
        if not await transaction_ended(connection):
            return  # they are due: the scheduler will find them
        for rid, token in pushes:
            # Rolled back: the run was never woken; its lease token matches
            # nothing and the push is refused, which is fine.
            await self._push(rid, token)
