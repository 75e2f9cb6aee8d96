"""Listing runs: the filters the dashboard and ``flowkeeper runs list`` share.

Run ids are UUIDv7 (48 bits of Unix milliseconds first), so "newest first" is
"id descending" and a creation-time range is an id range: every filter here is
answered by an index scan, and paging is a keyset cursor (``before=<run id>``)
rather than an offset that grows slower with every page.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from .boundary import text_problem
from .errors import ConfigurationError
from .models import RunStatus

__all__ = [
    "MAX_PAGE",
    "RunFilter",
    "RunPage",
    "RunSummary",
    "id_floor",
    "parse_time",
]

#: The most runs one page may hold.
MAX_PAGE = 500

_MIN_ID = uuid.UUID(int=0)
_MAX_ID = uuid.UUID(int=(1 << 128) - 1)
_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: Longest workflow name or search text a filter takes (names are at most 200).
_MAX_TEXT = 1000


def _checked(value: str | None, what: str) -> str | None:
    """Filter text as given, or ConfigurationError when no stored value could match
    it and Postgres could not even compare it (NUL, lone surrogates, absurd length)."""
    if value is None:
        return None
    problem = text_problem(value)
    if problem is not None:
        raise ConfigurationError(f"The {what} filter {problem}.")
    if len(value) > _MAX_TEXT:
        raise ConfigurationError(f"The {what} filter is longer than {_MAX_TEXT} characters.")
    return value


def id_floor(when: datetime) -> uuid.UUID:
    """The smallest UUIDv7 that can be made at ``when``: ids >= it were made at or after."""
    if when.tzinfo is None:
        raise ConfigurationError("Times given to the runs filter must be timezone-aware.")
    ms = int(when.timestamp() * 1000)
    ms = min(max(ms, 0), (1 << 48) - 1)
    return uuid.UUID(int=ms << 80)


def id_time(run_id: str | uuid.UUID) -> datetime:
    """When a UUIDv7 run id was made (to the millisecond)."""
    value = run_id.int if isinstance(run_id, uuid.UUID) else uuid.UUID(str(run_id)).int
    return datetime.fromtimestamp((value >> 80) / 1000, tz=UTC)


def parse_time(value: str | datetime | None, *, now: datetime | None = None) -> datetime | None:
    """``"15m"``, ``"2h"``, ``"7d"`` (that long ago), an ISO 8601 time, or a datetime.

    An ISO time without a zone is taken as UTC.  Raises ConfigurationError with
    the accepted forms when the value is none of those.
    """
    if value is None or isinstance(value, datetime):
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value
    text = value.strip()
    if not text:
        return None
    match = _AGO.match(text)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        try:
            return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
        except OverflowError:  # further back than year 1 (or than timedelta reaches)
            raise ConfigurationError(
                f"The time {value[:40]!r} is too long ago: use a duration such as 30m, 6h, "
                "2d or 1w, or an ISO 8601 time."
            ) from None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigurationError(
            f"Cannot read the time {value[:40]!r}: use a duration ago such as 30m, 6h, 2d, 1w, "
            "or an ISO 8601 time such as 2025-03-01T12:00:00Z."
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class RunFilter:
    """Which runs to list, newest first.

    ``search`` is an exact run id or an exact idempotency key; ``since`` and
    ``until`` bound the creation time; ``before`` is the paging cursor (the
    last run id of the previous page).
    """

    workflow: str | None = None
    status: RunStatus | None = None
    since: datetime | None = None
    until: datetime | None = None
    search: str | None = None
    before: str | None = None
    limit: int = 50

    @classmethod
    def build(
        cls,
        *,
        workflow: str | None = None,
        status: str | RunStatus | None = None,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        search: str | None = None,
        before: str | None = None,
        limit: int | str | None = None,
    ) -> RunFilter:
        """A filter from loosely typed input (query strings, CLI options), checked."""
        if status in (None, "", "all"):
            run_status = None
        else:
            try:
                run_status = RunStatus(str(status))
            except ValueError:
                raise ConfigurationError(
                    f"Unknown run status {str(status)[:40]!r}; use one of "
                    f"{', '.join(s.value for s in RunStatus)}."
                ) from None
        if before:
            try:
                before = str(uuid.UUID(before))
            except ValueError:
                raise ConfigurationError(f"The cursor {before[:60]!r} is not a run id.") from None
        try:
            size = 50 if limit in (None, "") else int(limit)
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"limit must be a whole number, got {str(limit)[:40]!r}"
            ) from None
        if not 1 <= size <= MAX_PAGE:
            raise ConfigurationError(f"limit must be between 1 and {MAX_PAGE}, got {size}")
        return cls(
            workflow=_checked(workflow or None, "workflow"),
            status=run_status,
            since=parse_time(since),
            until=parse_time(until),
            search=_checked((search or "").strip() or None, "search"),
            before=before or None,
            limit=size,
        )

    def id_range(self) -> tuple[uuid.UUID, uuid.UUID]:
        """The [low, high) run-id range this filter's times and cursor allow."""
        low = id_floor(self.since) if self.since else _MIN_ID
        high = id_floor(self.until) if self.until else _MAX_ID
        if self.before:
            high = min(high, uuid.UUID(self.before))
        return low, high

    def search_terms(self) -> tuple[uuid.UUID | None, str | None]:
        """The search as (run id, idempotency key): a UUID-looking text is tried as both."""
        if not self.search:
            return None, None
        try:
            return uuid.UUID(self.search), self.search
        except ValueError:
            return None, self.search

    def as_query(self) -> dict[str, str]:
        """The filter as query-string parameters (for links to the next page)."""
        out: dict[str, str] = {}
        if self.workflow:
            out["workflow"] = self.workflow
        if self.status:
            out["status"] = self.status.value
        if self.since:
            out["since"] = self.since.isoformat()
        if self.until:
            out["until"] = self.until.isoformat()
        if self.search:
            out["q"] = self.search
        if self.limit != 50:
            out["limit"] = str(self.limit)
        return out


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One line of the runs list."""

    id: str
    workflow: str
    status: RunStatus
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    due_at: datetime | None
    step_key: str | None
    step_attempt: int
    invocations: int
    steps: int
    error_type: str | None
    error_message: str | None
    error_step: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "workflow": self.workflow,
            "status": self.status.value,
            "idempotency_key": self.idempotency_key,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "due_at": _iso(self.due_at),
            "step_key": self.step_key,
            "step_attempt": self.step_attempt,
            "invocations": self.invocations,
            "steps": self.steps,
            "error": (
                {"type": self.error_type, "message": self.error_message, "step": self.error_step}
                if self.error_type
                else None
            ),
        }


@dataclass(frozen=True, slots=True)
class RunPage:
    """A page of the runs list, the counts per status, and the cursor to the next page."""

    runs: list[RunSummary]
    counts: dict[str, int] = field(default_factory=dict)
    next_before: str | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
