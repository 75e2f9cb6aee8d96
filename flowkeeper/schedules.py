"""Cron workflows: ``@fk.workflow("digest", cron="0 9 * * MON-FRI", timezone="Europe/Berlin")``.

The schedule lives in the ``schedules`` table (migration 0010).  The serving
app writes the schedules declared in its code when it starts (reconcile:
those no longer declared stop).  Every driver's tick fires the due slots:
in one transaction it locks the due schedules (``FOR UPDATE SKIP LOCKED``),
inserts one run per slot with the idempotency key ``cron:<slot in UTC>``
and moves ``next_at`` on, so a slot becomes exactly one run however many
drivers tick at once.  The run's input is the slot time (an aware
``datetime`` in the schedule's time zone); a workflow taking no input gets
none.  pg_cron asks the endpoint's ``/tick`` when a slot is due, since cron
expressions are evaluated here, with cronsim and zoneinfo.

Daylight saving time is handled as cron users expect (cronsim follows
Debian's cron): a slot inside the hour skipped in spring (02:30 in
Europe/Berlin on the last Sunday of March) fires once, at the first minute
after the gap (03:00); in autumn, a slot with a fixed hour inside the
repeated hour (``30 2 * * *``) fires once, in its first occurrence, while a
schedule matching every hour (``*/30 * * * *``) fires in both occurrences.

Catch-up after downtime (no driver ticked while slots came due):

* ``"latest"`` (default) — the most recent missed slot fires, the others are
  skipped (counted in ``skipped``);
* ``"all"`` — every missed slot fires, oldest first (at most 1,000 at once);
* ``"none"`` — missed slots are skipped; a slot fires only while it is less
  than five minutes late (so the driver must tick at least that often).

Pausing stops firing; resuming starts from the next slot after now (the
slots of the pause are not caught up).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ConfigurationError, ScheduleNotFoundError
from .ids import new_run_id

if TYPE_CHECKING:
    import asyncpg

    from .store import Store
    from .workflow import Registry, Workflow

logger = logging.getLogger("flowkeeper")

__all__ = ["CATCH_UP", "Schedule", "ScheduleInfo", "Schedules", "check_schedule", "next_slot"]

CATCH_UP = ("latest", "all", "none")
#: With catch_up="none", a slot later than this is skipped.
ON_TIME = timedelta(minutes=5)
#: With catch_up="all", at most this many missed slots fire at once.
MAX_CATCH_UP = 1000


@dataclass(frozen=True)
class Schedule:
    """A workflow's cron schedule, checked when the workflow is defined."""

    cron: str
    timezone: str = "UTC"
    catch_up: str = "latest"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def check_schedule(workflow: str, cron: Any, timezone: Any, catch_up: Any) -> Schedule | None:
    """``cron=``/``timezone=``/``catch_up=`` of the decorator, or a ConfigurationError."""
    from cronsim import CronSim, CronSimError

    if cron is None:
        if timezone is not None or catch_up is not None:
            raise ConfigurationError(
                f"Workflow {workflow!r}: timezone= and catch_up= only apply with cron=..."
            )
        return None
    if not isinstance(cron, str) or not cron.strip():
        raise ConfigurationError(
            f"Workflow {workflow!r}: cron= takes a cron expression such as '0 9 * * MON-FRI', "
            f"got {cron!r}"
        )
    tz = "UTC" if timezone is None else timezone
    if not isinstance(tz, str):
        raise ConfigurationError(
            f"Workflow {workflow!r}: timezone= takes an IANA name such as 'Europe/Berlin', "
            f"got {tz!r}"
        )
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigurationError(
            f"Workflow {workflow!r}: unknown time zone {tz!r} ({exc}); use an IANA name such "
            "as 'Europe/Berlin' or 'America/New_York'"
        ) from None
    mode = "latest" if catch_up is None else catch_up
    if mode not in CATCH_UP:
        raise ConfigurationError(
            f"Workflow {workflow!r}: catch_up= must be one of 'latest', 'all' or 'none', "
            f"got {catch_up!r}"
        )
    expr = " ".join(cron.split())
    try:
        next(CronSim(expr, datetime.now(zone)))
    except (CronSimError, StopIteration) as exc:
        raise ConfigurationError(
            f"Workflow {workflow!r}: invalid cron expression {cron!r} ({exc or 'never fires'}). "
            "Five fields: minute hour day-of-month month day-of-week, e.g. '0 9 * * MON-FRI'."
        ) from None
    return Schedule(cron=expr, timezone=tz, catch_up=mode)


def next_slot(cron: str, timezone: str, after: datetime) -> datetime:
    """The first slot strictly after ``after``, in UTC."""
    return next(_slots(cron, timezone, after))


def _slots(cron: str, timezone: str, after: datetime) -> Iterator[datetime]:
    from cronsim import CronSim

    zone = ZoneInfo(timezone)
    for slot in CronSim(cron, after.astimezone(zone)):
        # Compared in UTC: aware times of one zone compare by wall clock, and
        # the repeated autumn hour has two slots with the same wall clock.
        at = slot.astimezone(UTC)
        if at > after:  # cronsim may yield the start itself
            yield at


def slot_input(slot: datetime, timezone: str) -> str:
    """The run's input: the slot as an ISO 8601 time in the schedule's zone."""
    return json.dumps(slot.astimezone(ZoneInfo(timezone)).isoformat())


def slot_key(slot: datetime) -> str:
    return "cron:" + slot.astimezone(UTC).isoformat()


@dataclass(frozen=True)
class ScheduleInfo:
    """A stored schedule, as ``flowkeeper schedules list`` and the dashboard show it."""

    workflow: str
    cron: str
    timezone: str
    catch_up: str
    paused: bool
    removed_at: datetime | None
    next_at: datetime | None
    last_slot: datetime | None
    last_run: str | None
    last_status: str | None
    fired: int
    skipped: int

    @property
    def state(self) -> str:
        if self.removed_at is not None:
            return "removed"
        return "paused" if self.paused else "active"


@dataclass(frozen=True)
class Fired:
    workflow: str
    runs: list[str]
    skipped: int


class Schedules:
    """Reconciles, fires, lists, pauses and resumes schedules (its queries: sql/schedules.sql)."""

    def __init__(self, store: Store, registry: Registry) -> None:
        self.store = store
        self.registry = registry

    # declared in code ----------------------------------------------------------------------
    def declared(self) -> list[Workflow]:
        return [wf for wf in self.registry if wf.schedule is not None]

    async def reconcile(self, conn: asyncpg.Connection, *, authoritative: bool) -> list[str]:
        """Write the schedules this process declares (in ``conn``'s transaction); with
        ``authoritative`` (the serving app) stop those it no longer declares.  Returns
        the names stopped.  Called by ``FlowKeeper.reconcile``."""
        now = await self.store._call("fetchval", "clock_now", conn=conn)
        for wf in self.declared():
            spec = wf.schedule
            assert spec is not None
            first = next_slot(spec.cron, spec.timezone, now)
            flow = wf.flow(slot_input(first, spec.timezone) if wf.takes_input else "null")
            await self.store._call(
                "execute",
                "schedule_upsert",
                wf.name,
                spec.cron,
                spec.timezone,
                spec.catch_up,
                wf.takes_input,
                first,
                flow.keys,
                flow.limits,
                wf.priority,
                wf.timeout,
                wf.start_timeout,
                conn=conn,
            )
        if not authoritative:
            return []
        rows = await self.store._call(
            "fetch", "schedule_remove_others", [wf.name for wf in self.declared()], conn=conn
        )
        return [r["workflow"] for r in rows]

    # firing --------------------------------------------------------------------------------
    async def fire_due(self, limit: int = 100) -> list[Fired]:
        """Turn every due slot into a run (per the catch-up policy) and move next_at on."""
        await self.store.ensure_schema()
        fired: list[Fired] = []
        async with self.store.db.acquire() as conn, conn.transaction():
            rows = await self.store._call("fetch", "schedules_due", limit, conn=conn)
            for row in rows:
                fired.append(await self._fire(conn, row))
        for f in fired:
            if f.skipped:
                logger.warning(
                    "schedule %r: %d missed slot(s) skipped (catch-up policy)",
                    f.workflow,
                    f.skipped,
                )
        return fired

    async def _fire(self, conn: asyncpg.Connection, row: Any) -> Fired:
        now: datetime = row["now"]
        cron, tz, mode = row["cron"], row["timezone"], row["catch_up"]
        due: list[datetime] = []
        slots = _slots(cron, tz, row["next_at"] - timedelta(microseconds=1))
        following = next(slots)
        while following <= now:
            due.append(following)
            following = next(slots)
            if len(due) > 100_000:  # a minutely schedule down for months: stop counting
                following = next_slot(cron, tz, now)
                break
        if mode == "all":
            chosen = due[:MAX_CATCH_UP]
        elif mode == "latest":
            chosen = due[-1:]
        else:
            chosen = [s for s in due if now - s < ON_TIME]
        runs: list[str] = []
        known = self.registry.get(row["workflow"]) if row["workflow"] in self.registry else None
        for slot in chosen:
            input_json = slot_input(slot, tz) if row["takes_input"] else "null"
            # Keys from the code when this process has it (rate limits too), else as stored.
            flow = known.flow(input_json) if known is not None else None
            run_id, created = await self.store.insert_run(
                run_id=new_run_id(),
                workflow=row["workflow"],
                input_json=input_json,
                idempotency_key=slot_key(slot),
                lease_token=None,
                lease=timedelta(0),
                conn=conn,
                flow_keys=flow.keys if flow is not None else row["flow_keys"],
                flow_limits=flow.limits if flow is not None else row["flow_limits"],
                rate_keys=flow.rate_keys if flow is not None else None,
                rate_spacing=flow.rate_spacing if flow is not None else None,
                priority=row["priority"],
                timeout=row["timeout"],
                start_timeout=row["start_timeout"],
            )
            if created:
                runs.append(run_id)
        last = chosen[-1] if chosen else None
        await self.store._call(
            "execute",
            "schedule_fired",
            row["workflow"],
            following,
            last,
            uuid.UUID(runs[-1]) if runs else None,
            len(runs),
            len(due) - len(chosen),
            conn=conn,
        )
        return Fired(row["workflow"], runs, len(due) - len(chosen))

    # operator actions ---------------------------------------------------------------------
    async def list(self) -> list[ScheduleInfo]:
        rows = await self.store._call("fetch", "schedule_list")
        return [
            ScheduleInfo(
                workflow=r["workflow"],
                cron=r["cron"],
                timezone=r["timezone"],
                catch_up=r["catch_up"],
                paused=r["paused"],
                removed_at=r["removed_at"],
                next_at=r["next_at"],
                last_slot=r["last_slot"],
                last_run=str(r["last_run"]) if r["last_run"] else None,
                last_status=r["last_status"],
                fired=r["fired"],
                skipped=r["skipped"],
            )
            for r in rows
        ]

    async def _get(self, workflow: str) -> Any:
        row = await self.store._call("fetchrow", "schedule_get", workflow)
        if row is None:
            raise ScheduleNotFoundError(
                f"No schedule for workflow {workflow!r}. `flowkeeper schedules list` shows "
                "them; schedules are written when the app that declares cron=... starts."
            )
        return row

    async def pause(self, workflow: str) -> None:
        await self._get(workflow)
        await self.store._call("execute", "schedule_pause", workflow)

    async def resume(self, workflow: str) -> datetime:
        row = await self._get(workflow)
        if row["removed_at"] is not None:
            raise ScheduleNotFoundError(
                f"The schedule of {workflow!r} was removed from the code; it cannot be resumed."
            )
        following = next_slot(row["cron"], row["timezone"], row["now"])
        await self.store._call("execute", "schedule_resume", workflow, following)
        return following

    async def run_now(self, workflow: str) -> str:
        """Start one run now, as if a slot were due (its input: now)."""
        row = await self._get(workflow)
        now: datetime = row["now"].replace(microsecond=0)
        run_id, _ = await self.store.insert_run(
            run_id=new_run_id(),
            workflow=workflow,
            input_json=slot_input(now, row["timezone"]) if row["takes_input"] else "null",
            idempotency_key="cron:manual:" + now.astimezone(UTC).isoformat(),
            lease_token=None,
            lease=timedelta(0),
            flow_keys=row["flow_keys"],
            flow_limits=row["flow_limits"],
            priority=row["priority"],
            timeout=row["timeout"],
            start_timeout=row["start_timeout"],
        )
        return run_id
