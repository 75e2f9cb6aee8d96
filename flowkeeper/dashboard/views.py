"""JSON shapes the dashboard's pages render, and the HTML shells around them."""

from __future__ import annotations

import functools
import html
import json
from datetime import datetime
from importlib import resources
from string import Template
from typing import Any

from ..models import AttemptError, RunEvent, RunInfo, StepInfo
from ..runlist import RunPage
from .timeline import build


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


def run_json(info: RunInfo, now: datetime, version: str | None) -> dict[str, Any]:
    """Everything the run page shows, timeline included."""
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
        "version": version,
        "steps": [_step(s) for s in info.steps],
        "events": [_event(e) for e in info.events],
        "timeline": build(info, now).as_json(),
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
