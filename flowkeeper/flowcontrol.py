"""Flow control declared on a workflow: concurrency limits and priorities.

The limits are enforced in the claim itself (``flow_gate`` in migration
0009, asked by the ``claim_run`` query), so every driver obeys them alike:
the tick CLI, ``/tick``, pg_cron, the scheduler loop and trigger's own push.
What this module does is the Python half: check the declarations when the
workflow is defined, and turn a run's input into the keys and limits stored
on the run when it is triggered.

Keys: ``Concurrency(limit=5, key=lambda inp: inp.customer_id)`` limits the
runs of one workflow per key; ``scope="openai"`` shares one limit between
every workflow that declares the same scope (then the key, when given,
splits the scope further).  The stored key is ``wf:<workflow>:<key>`` or
``scope:<scope>:<key>``.

Priority: an integer from 0 to 1000, counted as minutes of head start in
the due order.  A run triggered with priority ``p`` is claimed before every
run that became due less than ``p`` minutes before it, and after those that
have waited longer: nothing starves, a low-priority run waits at most the
largest priority's minutes more than it would first-come first-served.
Among runs parked on a full concurrency key, the higher priority gets the
next slot, then trigger order.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, InvalidInputError
from .ids import new_run_id
from .names import name_problem, shown

if TYPE_CHECKING:
    import asyncpg

    from .store import Store
    from .workflow import Workflow

__all__ = [
    "Concurrency",
    "Debounce",
    "FlowKeys",
    "RateLimit",
    "check_priority",
    "check_rate_limit",
    "check_timeout",
    "flow_keys",
]

MAX_PRIORITY = 1000
_MAX_KEY = 200
#: The longest an invocation waits for a rate-limited run's start time before
#: leaving it to the drivers (seconds); a time that a late wake took is
#: waited for up to half the time budget (migration 0025).
START_WAIT = 1.0
#: A rate-limited start (or step call) woken up to this much after its time
#: -- or one spacing, if longer -- uses it: a late wake of that size bunches
#: at most a tenth of a second's starts, and a new time would waste the one
#: it had.  Later than that, it takes a new time.  (Migration 0025 says the
#: same in SQL.)
LATE_TOLERANCE = timedelta(milliseconds=100)

KeyFunction = Callable[[Any], Any]


@dataclass(frozen=True)
class Concurrency:
    """At most ``limit`` runs executing at once, per ``key`` (and per ``scope``).

    ``key`` is called with the run's validated input and must return a string
    (``None`` for one limit over every run).  ``scope`` names a limit shared
    by several workflows.  Sleeping and waiting runs hold no slot; a slot
    held by an invocation that died is free once its lease expires.  A run
    over its limit waits in ``queued`` and starts when a slot frees.
    """

    limit: int
    key: KeyFunction | None = None
    scope: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 1:
            raise ConfigurationError(
                f"Concurrency(limit=...) must be a whole number of at least 1, got {self.limit!r}"
            )
        if self.key is not None and not callable(self.key):
            raise ConfigurationError(
                "Concurrency(key=...) must be a function of the run's input returning a string, "
                f"e.g. key=lambda order: order.customer_id; got {self.key!r}"
            )
        if self.scope is not None:
            problem = name_problem(self.scope, _MAX_KEY) if isinstance(self.scope, str) else None
            if not isinstance(self.scope, str) or problem is not None:
                raise ConfigurationError(
                    f"Concurrency(scope=...) must be a short printable name, got "
                    f"{shown(self.scope) if isinstance(self.scope, str) else repr(self.scope)}"
                    + (f" ({problem})" if problem else "")
                )


@dataclass(frozen=True)
class Debounce:
    """A burst of triggers for one key becomes one run, started once the key has
    been quiet for ``period``, with the latest trigger's input.

    Every trigger of the burst returns the same run (``handle.created`` is True
    for the first only); once that run has started, the next trigger of the key
    starts a new burst.  The debounce key takes the place of the idempotency
    key: a retried trigger merges into the pending run, so ``idempotency_key``
    is not accepted for a debounced workflow.
    """

    period: timedelta
    key: KeyFunction | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.period, timedelta) or self.period <= timedelta(0):
            raise ConfigurationError(
                f"Debounce(period=...) must be a positive timedelta, e.g. "
                f"timedelta(seconds=30); got {self.period!r}"
            )
        Concurrency(limit=1, key=self.key)  # the same check of the key function

    def key_for(self, workflow: str, value: Any) -> str:
        return _key(workflow, "debounce", self.key, None, value)


async def merge_debounced(
    store: Store,
    wf: Workflow,
    input_json: str,
    key: str,
    flow: FlowKeys,
    priority: int,
    conn: asyncpg.Connection | None,
) -> tuple[str, bool]:
    """A trigger (or event) of a debounced workflow: the key's pending run takes
    ``input_json`` and waits for quiet, or a new run is made; (run id, created)."""
    assert wf.debounce is not None
    return await store.debounce_run(
        run_id=new_run_id(),
        workflow=wf.name,
        input_json=input_json,
        debounce_key=key,
        period=wf.debounce.period,
        flow=flow,
        priority=priority,
        timeout=wf.timeout,
        start_timeout=wf.start_timeout,
        conn=conn,
    )


def check_debounce(workflow: str, value: Any) -> Debounce | None:
    if value is None or isinstance(value, Debounce):
        return value
    raise ConfigurationError(
        f"Workflow {workflow!r}: debounce= takes Debounce(period=..., key=...), got {value!r}"
    )


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` run starts per ``period``, per ``key`` (and per ``scope``).

    A throttle: starts are spaced evenly (one every ``period / limit``); a run
    over the rate waits, due at the next free start time, and is never
    dropped.  Only starts count: a run resuming after a sleep is not
    throttled again.
    """

    limit: int
    period: timedelta = timedelta(seconds=1)
    key: KeyFunction | None = None
    scope: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 1:
            raise ConfigurationError(
                f"RateLimit(limit=...) must be a whole number of at least 1, got {self.limit!r}"
            )
        if not isinstance(self.period, timedelta) or self.period <= timedelta(0):
            raise ConfigurationError(
                f"RateLimit(period=...) must be a positive timedelta, e.g. "
                f"timedelta(seconds=1); got {self.period!r}"
            )
        Concurrency(limit=1, key=self.key, scope=self.scope)  # the same checks of key and scope

    @property
    def spacing(self) -> timedelta:
        return self.period / self.limit


def check_rate_limit(workflow: str, value: Any) -> tuple[RateLimit, ...]:
    """``rate_limit=`` as given to the decorator: one limit or a sequence of them."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, RateLimit) else value
    if (
        not isinstance(items, Sequence)
        or isinstance(items, str)
        or not all(isinstance(i, RateLimit) for i in items)
    ):
        raise ConfigurationError(
            f"Workflow {workflow!r}: rate_limit= takes RateLimit(limit=..., period=...) or a "
            f"list of them, got {value!r}"
        )
    return tuple(items)


def check_concurrency(workflow: str, value: Any) -> tuple[Concurrency, ...]:
    """``concurrency=`` as given to the decorator: one limit or a sequence of them."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, Concurrency) else value
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise ConfigurationError(
            f"Workflow {workflow!r}: concurrency= takes Concurrency(...) or a list of them, "
            f"got {value!r}"
        )
    limits = tuple(items)
    for item in limits:
        if not isinstance(item, Concurrency):
            raise ConfigurationError(
                f"Workflow {workflow!r}: concurrency= takes Concurrency(limit=..., key=...) "
                f"items, got {item!r}"
            )
    return limits


def check_priority(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_PRIORITY:
        raise ConfigurationError(
            f"{where}: priority must be a whole number from 0 to {MAX_PRIORITY} (minutes of "
            f"head start in the due order), got {value!r}"
        )
    return value


def check_timeout(value: Any, where: str) -> timedelta | None:
    """A run timeout: a positive timedelta or number of seconds (None: no timeout)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        delta = value
    elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        try:
            delta = timedelta(seconds=value)
        except OverflowError:
            raise ConfigurationError(f"{where} is too long: {value!r} seconds") from None
    else:
        raise ConfigurationError(
            f"{where} must be a timedelta or a number of seconds, e.g. timedelta(hours=1); "
            f"got {value!r}"
        )
    if delta <= timedelta(0):
        raise ConfigurationError(f"{where} must be positive, got {value!r}")
    return delta


@dataclass(frozen=True)
class FlowKeys:
    """What a run stores for the claim to enforce: its keys and their limits."""

    keys: list[str] | None
    limits: list[int] | None
    rate_keys: list[str] | None = None
    rate_spacing: list[timedelta] | None = None


NO_KEYS = FlowKeys(None, None)


def _key(workflow: str, what: str, fn: KeyFunction | None, scope: str | None, value: Any) -> str:
    part = ""
    if fn is not None:
        try:
            got = fn(value)
        except Exception as exc:
            raise InvalidInputError(
                workflow, f"The {what} key function raised {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(got, str):
            raise InvalidInputError(
                workflow, f"The {what} key function must return a string, it returned {got!r}"
            )
        problem = name_problem(got, _MAX_KEY)
        if problem is not None:
            raise InvalidInputError(workflow, f"The {what} key {shown(got)} {problem}.")
        part = got
    name = f"scope:{scope}" if scope is not None else f"wf:{workflow}"
    return f"{name}:{part}"


def flow_keys(
    workflow: str,
    limits: Sequence[Concurrency],
    value: Any,
    rates: Sequence[RateLimit] = (),
) -> FlowKeys:
    """The run's concurrency and rate keys for input ``value``.

    A key function that raises or returns something other than a string
    fails the trigger with :class:`InvalidInputError` (nothing is created).
    """
    if not limits and not rates:
        return NO_KEYS
    keys: dict[str, int] = {}
    for limit in limits:
        key = _key(workflow, "concurrency", limit.key, limit.scope, value)
        # The same key declared twice: the tighter limit wins.
        keys[key] = min(keys.get(key, limit.limit), limit.limit)
    spacing: dict[str, timedelta] = {}
    for rate in rates:
        key = "rate:" + _key(workflow, "rate limit", rate.key, rate.scope, value)
        spacing[key] = max(spacing.get(key, rate.spacing), rate.spacing)
    return FlowKeys(
        list(keys) or None,
        list(keys.values()) or None,
        list(spacing) or None,
        list(spacing.values()) or None,
    )


# what the dashboard and `flowkeeper status` show ---------------------------------------------
@dataclass(frozen=True)
class TableUsage:
    name: str
    rows: int
    estimated: bool  # the planner's estimate (a million rows or more), not a count
    bytes: int


@dataclass(frozen=True)
class KeyUsage:
    key: str
    held: int
    parked: int
    limit: int | None


@dataclass(frozen=True)
class QueuedReason:
    """Why a live run has not started yet, in words (``text``) and parts."""

    text: str
    blocked_key: str | None = None
    key_limit: int | None = None
    key_held: int | None = None
    ahead: int | None = None
    due_at: Any = None


class FlowStatus:
    """Read-only views of flow control and of the schema's size (sql/flowcontrol.sql)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def schema_usage(self) -> list[TableUsage]:
        rows = await self.store._call("fetch", "schema_usage")
        return [
            TableUsage(r["name"], int(r["rows"]), r["estimated"], int(r["bytes"])) for r in rows
        ]

    async def key_usage(self, limit: int = 50) -> list[KeyUsage]:
        rows = await self.store._call("fetch", "flow_usage", limit)
        return [
            KeyUsage(r["key"], r["held"], r["parked"], r["held_limit"] or r["parked_limit"])
            for r in rows
        ]

    async def queued_reason(self, run_id: str) -> QueuedReason | None:
        """None when the run is not waiting to start (or does not exist)."""
        row = await self.store._call("fetchrow", "queued_reason", uuid.UUID(run_id))
        if row is None or row["status"] != "queued":
            return None
        if row["blocked_key"] is not None:
            return QueuedReason(
                text=(
                    f"waiting for a concurrency slot of {row['blocked_key']} "
                    f"({row['key_held']} of {row['key_limit']} held, {row['ahead']} run(s) ahead; "
                    f"priority {row['priority']})"
                ),
                blocked_key=row["blocked_key"],
                key_limit=row["key_limit"],
                key_held=row["key_held"],
                ahead=row["ahead"],
            )
        due = row["due_at"]
        if due is not None and due > row["now"]:
            when = due.isoformat(timespec="seconds")
            reserved = row["throttled_until"]
            if reserved is not None and row["started_at"] is None and reserved <= row["now"]:
                # Late twice (migration 25): due_at is when it is looked at again,
                # not a start time it holds.
                text = (
                    f"throttled by its rate limit: its start time "
                    f"{reserved.isoformat(timespec='seconds')} passed before a driver "
                    f"claimed it; it keeps its place in line and is looked at again at "
                    f"{when}, once the limit's next start time is within a driver's reach"
                )
            elif reserved is not None and row["started_at"] is None:
                text = f"throttled by its rate limit until {when}"
            elif row["debounce_key"] is not None and row["started_at"] is None:
                text = f"debounced until {when} (key {row['debounce_key']}; starts once quiet)"
            else:
                text = f"not due until {when}"
            return QueuedReason(text=text, due_at=due)
        return QueuedReason(
            text=f"due now, waiting for a driver to claim it (priority {row['priority']})",
            due_at=due,
        )


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover
