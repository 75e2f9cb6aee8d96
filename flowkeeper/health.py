"""Driver health: is anything dispatching due runs, and are runs piling up?

Every driver records its ticks in ``driver_ticks`` (kind and place): the tick
CLI (``cli``), the endpoint's ``/tick`` (``http``), the ``flowkeeper
scheduler`` loop (``loop``), ``fk.tick()`` called from the application
(``python``); pg_cron's tick is read from its own settings row (``pgcron``).
:func:`check` puts that next to the backlog (runs due, and overdue: due for
longer than a few minutes) and says in words what is wrong: the dashboard
shows it as a banner, ``flowkeeper doctor`` and ``flowkeeper status`` print it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .errors import DatabaseError

if TYPE_CHECKING:
    from .models import TickResult
    from .store import Store

logger = logging.getLogger("flowkeeper")

#: A run due for longer than this (seconds) is overdue: nothing dispatched it.
OVERDUE_AFTER = 180.0
#: No driver seen for longer than this (seconds): none is running.
STALE_AFTER = 300.0

#: How to start a driver, for messages.
START_A_DRIVER = (
    "start one: `flowkeeper scheduler` (a loop, on an always-on host), `flowkeeper tick` from "
    "cron every minute, a cron calling GET <endpoint>/tick with CRON_SECRET (Vercel Cron, "
    "EventBridge), or `flowkeeper pgcron install` (pg_cron inside Postgres)"
)

_DRIVER: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "flowkeeper_driver", default=None
)


def here() -> str:
    """This process, as a driver's place."""
    return f"{socket.gethostname()} pid {os.getpid()}"


@contextlib.contextmanager
def driving(kind: str, place: str | None = None) -> Iterator[None]:
    """Ticks made inside are recorded as this driver kind (the endpoint's /tick uses it)."""
    token = _DRIVER.set((kind, place or here()))
    try:
        yield
    finally:
        _DRIVER.reset(token)


async def record_tick(store: Store, kind: str, result: TickResult) -> None:
    """Record a tick (never the tick's failure: a health write that fails is logged)."""
    driver = _DRIVER.get()
    kind, place = driver if driver is not None else (kind, here())
    last_error = None
    if result.errors:
        last_error = max(result.errors.items(), key=lambda kv: kv[1])[0][:500]
    try:
        await store.driver_ticked(kind, place, result.claimed, result.failed, last_error)
        if random.random() < 0.02:  # forget drivers gone for a week (Lambda hosts come and go)
            await store.driver_prune()
    except DatabaseError as exc:
        logger.warning("tick: could not record the driver's health: %s", exc)
    from . import metrics

    await metrics.on_tick(store, kind, result)


@dataclass(frozen=True, slots=True)
class Driver:
    """A driver seen ticking."""

    kind: str
    place: str
    last_at: datetime
    age: float  # seconds since its last tick (database clock)
    ticks: int | None
    claimed: int
    failed: int
    last_error: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "place": self.place,
            "last_at": self.last_at.isoformat(),
            "age": round(self.age, 1),
            "ticks": self.ticks,
            "claimed": self.claimed,
            "failed": self.failed,
            "last_error": self.last_error,
        }


@dataclass(frozen=True, slots=True)
class Health:
    """Drivers seen, the backlog, and what is wrong (empty ``problems``: all well)."""

    drivers: list[Driver]
    due: int
    overdue: int
    oldest_due_age: float | None
    overdue_after: float
    stale_after: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def last_tick_age(self) -> float | None:
        return min((d.age for d in self.drivers), default=None)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "due": self.due,
            "overdue": self.overdue,
            "oldest_due_age": self.oldest_due_age,
            "last_tick_age": self.last_tick_age,
            "drivers": [d.as_json() for d in self.drivers],
            "start_a_driver": START_A_DRIVER,
        }


def ago(seconds: float) -> str:
    """``14 min``, ``2 h``, ``40 s``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _runs(n: int) -> str:
    return f"{n} run{'s' if n != 1 else ''}"


async def check(
    store: Store, *, overdue_after: float = OVERDUE_AFTER, stale_after: float = STALE_AFTER
) -> Health:
    """Read the drivers and the backlog; say what is wrong, in words."""
    rows = await store.driver_list()
    drivers = [
        Driver(
            r["kind"],
            r["place"],
            r["last_at"],
            float(r["age"]),
            int(r["ticks"]),
            int(r["claimed"]),
            int(r["failed"]),
            r["last_error"],
        )
        for r in rows
    ]
    pgcron = await store.pgcron_last_tick()
    if pgcron is not None:
        drivers.append(
            Driver(
                "pgcron",
                str(pgcron["job_name"]),
                pgcron["last_at"],
                float(pgcron["age"]),
                None,
                int(pgcron["claimed"] or 0),
                int(pgcron["failed"] or 0),
                pgcron["last_error"],
            )
        )
        drivers.sort(key=lambda d: d.age)
    backlog = await store.backlog(overdue_after)
    due, overdue = int(backlog["due"]), int(backlog["overdue"])
    oldest = float(backlog["oldest_age"]) if backlog["oldest_age"] is not None else None
    problems: list[str] = []
    fresh = [d for d in drivers if d.age <= stale_after]
    if not drivers:
        problems.append(
            "no driver has ever ticked"
            + (f"; {_runs(overdue)} overdue" if overdue else "")
            + f": nothing dispatches due runs. {START_A_DRIVER}."
        )
    elif not fresh:
        problems.append(
            f"no driver has ticked for {ago(drivers[0].age)}"
            + (f"; {_runs(overdue)} overdue" if overdue else "")
            + f". Is a driver running? The last was {drivers[0].kind} at {drivers[0].place}; "
            f"{START_A_DRIVER}."
        )
    elif overdue:
        failing = [d for d in fresh if d.failed and d.last_error]
        why = (
            f" Its dispatches fail: {failing[0].last_error} (run `flowkeeper doctor`)."
            if failing
            else " Drivers may be too few or too slow for the load (run `flowkeeper doctor`)."
        )
        problems.append(
            f"{_runs(overdue)} overdue (the oldest due for {ago(oldest or 0)}) although "
            f"{fresh[0].kind} at {fresh[0].place} ticked {ago(fresh[0].age)} ago.{why}"
        )
    return Health(drivers, due, overdue, oldest, overdue_after, stale_after, problems)


def overdue_note(due_at: datetime | None, now: datetime, status: str) -> str | None:
    """For one run: "due 12 min ago — is a driver running?", or None when not overdue."""
    if due_at is None or status in ("completed", "failed", "cancelled"):
        return None
    late = (now - due_at).total_seconds()
    if late < OVERDUE_AFTER:
        return None
    return (
        f"overdue: due {ago(late)} ago and not dispatched. Is a driver running? {START_A_DRIVER}."
    )
