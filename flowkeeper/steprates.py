"""Rate limits on single steps: ``ctx.step("summarize", call, rate_limit="openai")``.

The limits are declared on the FlowKeeper by name
(``FlowKeeper(rate_limits={"openai": RateLimit(limit=10, period=timedelta(seconds=1))})``)
and shared by every step, run and process that names them.  Like a run-level
:class:`~flowkeeper.RateLimit` they are a throttle with no burst: each attempt
of a rate-limited step takes the next start time of its limit (one every
``period / limit``, kept in Postgres), and starts then.  Nothing is dropped.

An attempt whose start time is near (within :data:`MAX_WAIT`, and within the
invocation's time budget) waits for it in the invocation.  One further off
puts the run to sleep until then, and the time it took is kept as a ticket
(table ``step_tickets``), so the resumed run starts the step at that time
instead of taking another, however often it is woken early or handed on.
A run woken more than one spacing (or 0.1 s, if longer) after its ticket's
time (the app was down, or its driver ticks coarsely) takes a new time
instead, and waits for it in the invocation up to half its remaining time
budget: every call starts within that tolerance of a time it took, so no
window sees more than its share of calls, however late runs are woken.  A
new time beyond that reach is kept as the ticket once; a second late use
takes a time only within reach, else the run keeps its place and sleeps
until the limit's next time comes within reach.  So a driver coarser than
the spacing (pg_cron's minute) drains a backlog at about ``reach / tick`` of
the limit instead of exchanging it to the back of the queue for ever.
Each attempt takes one start time: a retry takes a new one, a replay of a
recorded result takes none.  A start time taken by an invocation that then
died is not given back: the limit errs towards fewer calls, never more.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, StepUsageError
from .flowcontrol import LATE_TOLERANCE, RateLimit
from .names import name_problem, shown

if TYPE_CHECKING:
    from .store import Store

__all__ = ["MAX_WAIT", "StepRates", "Ticket", "check_step_rates"]

#: The longest an invocation waits for a step's start time before it puts the
#: run to sleep instead (seconds).
MAX_WAIT = 1.0
_MAX_NAME = 100


def check_step_rates(value: Any) -> dict[str, RateLimit]:
    """``FlowKeeper(rate_limits=...)``: a mapping of limit names to :class:`RateLimit`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            "FlowKeeper(rate_limits=...) takes a dict of names to RateLimit, e.g. "
            '{"openai": RateLimit(limit=10, period=timedelta(seconds=1))}; '
            f"got {value!r:.100}"
        )
    limits: dict[str, RateLimit] = {}
    for name, limit in value.items():
        problem = name_problem(name, _MAX_NAME) if isinstance(name, str) else "is not a string"
        if problem is not None:
            what = shown(name) if isinstance(name, str) else repr(name)
            raise ConfigurationError(
                f"FlowKeeper(rate_limits=...): the name {what} {problem}; use a short "
                'printable name such as "openai".'
            )
        if not isinstance(limit, RateLimit):
            raise ConfigurationError(
                f"FlowKeeper(rate_limits=...): {name!r} must be a RateLimit(limit=..., "
                f"period=...), got {limit!r:.100}"
            )
        if limit.key is not None or limit.scope is not None:
            raise ConfigurationError(
                f"FlowKeeper(rate_limits=...): {name!r} is a step rate limit, shared by its "
                "name; it takes no key= or scope= (those are for a workflow's rate_limit=)."
            )
        limits[name] = limit
    return limits


@dataclass(frozen=True, slots=True)
class Ticket:
    """An attempt's start time under its limit."""

    slot: datetime  # when the attempt may start (database clock)
    now: datetime  # the database clock when it was taken
    fresh: bool  # taken by this call (not a ticket held from before)
    kept: bool  # further off than the caller waits: kept as the attempt's ticket
    exchanged: bool = False  # the ticket held was already a late exchange

    @property
    def wait(self) -> float:
        """Seconds from ``now`` until the attempt may start (0 if it may now)."""
        return max(0.0, (self.slot - self.now).total_seconds())


class StepRates:
    """The step rate limits of one FlowKeeper, and taking a start time under them."""

    def __init__(self, store: Store, limits: Mapping[str, RateLimit]) -> None:
        self.store = store
        self.limits = dict(limits)

    def check(self, step: str, name: object) -> RateLimit:
        """The limit a step names; a :class:`StepUsageError` for one not declared."""
        limit = self.limits.get(name) if isinstance(name, str) else None
        if limit is None:
            declared = ", ".join(repr(n) for n in sorted(self.limits)) or "none"
            raise StepUsageError(
                f"ctx.step({step!r}, ..., rate_limit={name!r:.100}): no such rate limit is "
                f"declared (declared: {declared}). Declare it on the FlowKeeper: "
                f"FlowKeeper(rate_limits={{{name!r:.100}: RateLimit(limit=..., period=...)}})."
            )
        return limit

    async def take(
        self,
        run_id: str,
        step_key: str,
        attempt: int,
        name: str,
        horizon: float,
        late_horizon: float,
    ) -> Ticket:
        """The start time of this attempt: a ticket it holds, or the limit's next one.

        A time more than ``horizon`` seconds away is kept as the attempt's
        ticket; one within it is the caller's to wait for now.  A ticket whose
        time passed more than one spacing (or 0.1 s, if longer) ago (the run
        was woken late: an outage, a coarse driver) is exchanged for the
        limit's next time, kept as a ticket only beyond ``late_horizon``:
        every call starts within that tolerance of a time it took, so late
        wakes never bunch calls together.
        A ticket that was already such an exchange takes a time only within
        ``late_horizon``; else it is kept as it was, and the returned ``slot``
        is when to look again (a ``kept`` ticket that is not ``fresh``).
        """
        limit = self.limits[name]
        ticket = await self._take(run_id, step_key, attempt, name, limit, horizon)
        if not ticket.fresh and ticket.slot < ticket.now - max(limit.spacing, LATE_TOLERANCE):
            # Used up by the first call (deleted): this one takes a new time.
            row = await self.store.step_rate_retake(
                uuid.UUID(run_id),
                step_key,
                attempt,
                f"step:{name}",
                limit.spacing,
                timedelta(seconds=max(0.0, late_horizon)),
                ticket.slot,
                ticket.exchanged,
            )
            ticket = _ticket(row)
        return ticket

    async def _take(
        self,
        run_id: str,
        step_key: str,
        attempt: int,
        name: str,
        limit: RateLimit,
        horizon: float,
    ) -> Ticket:
        row = await self.store.step_rate_take(
            uuid.UUID(run_id),
            step_key,
            attempt,
            f"step:{name}",
            limit.spacing,
            timedelta(seconds=max(0.0, horizon)),
        )
        return _ticket(row)


def _ticket(row: Any) -> Ticket:
    return Ticket(
        slot=row["slot"],
        now=row["now"],
        fresh=bool(row["fresh"]),
        kept=bool(row["kept"]),
        exchanged=bool(row["exchanged"]),
    )
