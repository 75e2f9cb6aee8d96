"""JSON shapes the dashboard's pages render, and the HTML shells around them."""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Sequence
from datetime import datetime
from importlib import resources
from string import Template
from typing import Any

from ..eventlist import EventPage
from ..eventops import EventInfo, WaitInfo
from ..flowcontrol import KeyUsage, TableUsage
from ..health import overdue_note
from ..models import AttemptError, RunEvent, RunInfo, StepInfo
from ..runlist import RunPage
from ..schedules import ScheduleInfo
from ..steplogs import LogLine
from .timeline import build

#: How much of an event's data the events list shows.
PREVIEW_CHARS = 160


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _attempt(a: AttemptError) -> dict[str, Any]:
    return {
        "attempt": a.attempt,
        "error_type": a.error_type,
        "message": a.message,
        "traceback": a.traceback,
        "started_at": _iso(a.started_at),
        "finished_at": _iso(a.finished_at),
        "retry_at": _iso(a.retry_at),
    }


def _step(s: StepInfo) -> dict[str, Any]:
    duration = None
    if s.started_at and s.finished_at:
        duration = (s.finished_at - s.started_at).total_seconds()
    return {
        "key": s.key,
        "name": s.name,
        "position": s.position,
        "kind": s.kind,
        "status": s.status,
        "attempts": s.attempts,
        "input": s.input,
        "output": s.output,
        "error": s.error,
        "started_at": _iso(s.started_at),
        "finished_at": _iso(s.finished_at),
        "wake_at": _iso(s.wake_at),
        "duration": duration,
        "failed_attempts": [_attempt(a) for a in s.failed_attempts],
    }


def _event(e: RunEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": e.at.isoformat(),
        "kind": e.kind,
        "step_key": e.step_key,
        "attempt": e.attempt,
        "detail": e.detail,
    }


def run_json(
    info: RunInfo,
    now: datetime,
    version: str | None,
    waits: Sequence[WaitInfo] = (),
    logs: Sequence[LogLine] = (),
    *,
    parent: tuple[str, str | None] | None = None,
    children: Sequence[Any] = (),
    children_total: int = 0,
) -> dict[str, Any]:
    """Everything the run page shows: timeline, waits, log lines and child runs."""
    by_step: dict[str | None, list[dict[str, Any]]] = {}
    for line in logs:
        by_step.setdefault(line.step, []).append(line.as_json())
    steps = [_step(s) for s in info.steps]
    for step in steps:
        step["logs"] = by_step.pop(step["key"], [])
    return {
        "id": info.id,
        "workflow": info.workflow,
        "status": info.status.value,
        "input": info.input,
        "output": info.output,
        "error": info.error,
        "idempotency_key": info.idempotency_key,
        "created_at": info.created_at.isoformat(),
        "updated_at": info.updated_at.isoformat(),
        "started_at": _iso(info.started_at),
        "finished_at": _iso(info.finished_at),
        "due_at": _iso(info.due_at),
        "invocations": info.invocations,
        "code_version": info.code_version,
        "version": version,
        "steps": steps,
        # Lines of the workflow function itself, and of steps not recorded (yet).
        "workflow_logs": by_step.pop(None, []),
        "other_logs": [line for lines in by_step.values() for line in lines],
        "overdue": overdue_note(info.due_at, now, info.status.value),
        "events": [_event(e) for e in info.events],
        "waits": [w.as_json() for w in waits],
        "timeline": build(info, now, waits).as_json(),
        "parent": {"id": parent[0], "step": parent[1]} if parent else None,
        "children": [
            {
                "id": str(c["id"]),
                "workflow": c["workflow"],
                "status": c["status"],
                "step": c["parent_step"],
                "created_at": c["created_at"].isoformat(),
                "finished_at": _iso(c["finished_at"]),
            }
            for c in children
        ],
        "children_total": children_total,
    }


def page_json(page: RunPage, workflows: list[str], query: dict[str, str]) -> dict[str, Any]:
    """Everything the runs list shows."""
    return {
        "runs": [r.as_json() for r in page.runs],
        "counts": page.counts,
        "total": page.total,
        "next_before": page.next_before,
        "workflows": workflows,
        "query": query,
    }


def _event_summary(e: EventInfo) -> dict[str, Any]:
    preview = json.dumps(e.data, ensure_ascii=False, separators=(", ", ": "), default=str)
    if len(preview) > PREVIEW_CHARS:
        preview = preview[: PREVIEW_CHARS - 1] + "…"
    return {
        "number": e.id,
        "name": e.name,
        "event_id": e.event_id,
        "sent_at": e.sent_at.isoformat(),
        "sent_by_run": e.sent_by_run,
        "woke": e.woke,
        "started": len(e.started),
        "cancelled": e.cancelled,
        "preview": preview,
    }


def events_json(page: EventPage) -> dict[str, Any]:
    """Everything the Events page shows: a page of events, newest first."""
    return {
        "events": [_event_summary(e) for e in page.events],
        "next_before": page.next_before,
        "query": page.query,
    }


def event_json(e: EventInfo) -> dict[str, Any]:
    """One event's page: its data, who sent it, and the runs it woke, started or cancelled."""
    return {
        **_event_summary(e),
        "data": e.data,
        "effects": [{**effect, "at": _iso(effect["at"])} for effect in (e.effects or [])],
    }


# HTML shells --------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _template(name: str) -> Template:
    text = resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")
    return Template(text)


def script_json(data: Any) -> str:
    """JSON safe to place inside <script type="application/json">."""
    text = json.dumps(data, separators=(",", ":"), default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(name: str, **values: str) -> str:
    """Fill a template; every value is HTML-escaped except ``*_json`` and ``*_html`` ones
    (made safe by :func:`script_json` or built from escaped parts)."""
    safe = {
        k: (v if k.endswith(("_json", "_html")) else html.escape(v, quote=True))
        for k, v in values.items()
    }
    return _template(name).substitute(safe)


def schedules_json(
    schedules: Sequence[ScheduleInfo],
    keys: Sequence[KeyUsage],
    tables: Sequence[TableUsage],
    schema: str,
) -> dict[str, Any]:
    """The schedules page: cron schedules, concurrency-key usage, the schema's size."""

    def iso(at: datetime | None) -> str | None:
        return at.isoformat() if at is not None else None

    return {
        "schedules": [
            {
                "workflow": s.workflow,
                "cron": s.cron,
                "timezone": s.timezone,
                "catch_up": s.catch_up,
                "state": s.state,
                "next_at": iso(s.next_at),
                "last_slot": iso(s.last_slot),
                "last_run": s.last_run,
                "last_status": s.last_status,
                "fired": s.fired,
                "skipped": s.skipped,
            }
            for s in schedules
        ],
        "keys": [
            {"key": k.key, "held": k.held, "parked": k.parked, "limit": k.limit} for k in keys
        ],
        "storage": {
            "schema": schema,
            "bytes": sum(t.bytes for t in tables),
            "tables": [
                {"name": t.name, "rows": t.rows, "estimated": t.estimated, "bytes": t.bytes}
                for t in tables
            ],
        },
    }
