"""Retention: finished runs are deleted once they are older than their status's period.

``FlowKeeper(retention=Retention(completed=timedelta(days=7), failed=timedelta(days=30)))``
sets the default; ``@fk.workflow(..., retention=Retention(...))`` a workflow's
own.  The serving app writes the policies into the ``retention`` table when it
starts (like the cron schedules), so every driver prunes alike, pg_cron
included: each tick deletes a small batch per policy (``prune_runs`` in
migration 0016: short transactions, SKIP LOCKED, never a run still held by an
invocation nor one whose failure alert is undelivered), and a driver spends at
most ``Scheduler.RETAIN_SHARE`` of its time on it.  A status left out
(``None``) is kept for ever.  ``flowkeeper runs prune --older-than 30d
--status completed`` deletes by hand.

Idempotency window: an idempotency key (and a cron slot's key) is
remembered as long as its run is kept.  Once a completed run is pruned, a
trigger with its key starts a new run: choose ``completed=`` longer than the
time within which a caller may retry a trigger.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    import asyncpg

    from .store import Store
    from .workflow import Registry

logger = logging.getLogger("flowkeeper")

__all__ = ["Pruner", "Retention", "parse_age"]

STATUSES = ("completed", "failed", "cancelled")


def _period(value: Any, name: str) -> timedelta | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        delta = value
    elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        delta = timedelta(seconds=value)
    else:
        raise ConfigurationError(
            f"Retention({name}=...) takes a timedelta (or seconds), e.g. timedelta(days=7); "
            f"got {value!r}"
        )
    if delta <= timedelta(0):
        raise ConfigurationError(f"Retention({name}=...) must be positive, got {value!r}")
    return delta


@dataclass(frozen=True)
class Retention:
    """How long finished runs are kept, per final status (``None``: for ever)."""

    completed: timedelta | None = None
    failed: timedelta | None = None
    cancelled: timedelta | None = None

    def __post_init__(self) -> None:
        for name in STATUSES:
            object.__setattr__(self, name, _period(getattr(self, name), name))


def check_retention(value: Any, where: str) -> Retention | None:
    if value is None or isinstance(value, Retention):
        return value
    raise ConfigurationError(
        f"{where}: retention= takes Retention(completed=..., failed=...), got {value!r}"
    )


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s``: for the CLI's --older-than."""
    t = text.strip().lower()
    if len(t) >= 2 and t[-1] in _UNITS and t[:-1].isdigit() and int(t[:-1]) > 0:
        return timedelta(seconds=int(t[:-1]) * _UNITS[t[-1]])
    raise ConfigurationError(
        f"--older-than takes a positive number and a unit (s, m, h, d, w), e.g. 30d; got {text!r}"
    )


class Pruner:
    """Writes the policies (on deploy) and deletes runs past them (on every tick)."""

    BATCH = 200

    def __init__(self, store: Store, registry: Registry, default: Retention | None) -> None:
        self.store = store
        self.registry = registry
        self.default = default

    async def reconcile(self, conn: asyncpg.Connection, *, authoritative: bool) -> None:
        """Store this process's policies; the serving app's replace every other."""
        policies: dict[str, Retention] = {}
        if self.default is not None:
            policies[""] = self.default
        for wf in self.registry:
            if wf.retention is not None:
                policies[wf.name] = wf.retention
        for name, p in policies.items():
            await self.store._call(
                "execute",
                "retention_upsert",
                name,
                p.completed,
                p.failed,
                p.cancelled,
                conn=conn,
            )
        if authoritative:
            await self.store._call("execute", "retention_remove_others", list(policies), conn=conn)

    async def prune(self, batch: int | None = None) -> int:
        """One small batch per policy and status; the runs deleted."""
        return int(await self.store._call("fetchval", "prune_runs", batch or self.BATCH) or 0)

    async def prune_by_hand(
        self, status: str, older_than: timedelta, *, workflow: str | None = None, batch: int = 1000
    ) -> int:
        """Delete every ``status`` run finished more than ``older_than`` ago, in batches."""
        if status not in STATUSES:
            raise ConfigurationError(
                f"--status must be one of {', '.join(STATUSES)} (live runs are never pruned); "
                f"got {status!r}"
            )
        total = 0
        while True:
            if workflow is None:
                n = await self.store._call("fetchval", "prune_manual", status, older_than, batch)
            else:
                n = await self.store._call(
                    "fetchval", "prune_manual_workflow", status, older_than, batch, workflow
                )
            total += int(n)
            if n < batch:
                return total
