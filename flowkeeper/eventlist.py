"""Listing events: the filters the dashboard's Events page and ``flowkeeper events list`` share.

Events are numbered in the order they were stored (``event_log.id``), so
"newest first" is "number descending" and paging is a keyset cursor
(``before=<event number>``), answered by the primary key or the
``(name, id)`` index, never an offset.  Filters are exact: an event name, or
the sender's dedup id.  Whatever cannot match a stored event and could not
even be compared by Postgres (NUL, lone surrogates, absurd lengths, numbers
outside ``bigint``) is refused here with a :class:`ConfigurationError` that
says why, so the dashboard answers 400 and the CLI exits with the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .boundary import text_problem
from .errors import ConfigurationError
from .events import MAX_EVENT_ID, MAX_EVENT_NAME

__all__ = ["MAX_EVENT_PAGE", "EventFilter", "EventPage", "parse_event_number"]

#: The most events one page may hold.
MAX_EVENT_PAGE = 200
#: Event numbers are Postgres bigints.
_MAX_NUMBER = (1 << 63) - 1


def parse_event_number(value: object, what: str = "An event number") -> int:
    """A positive event number from text or an int, or ConfigurationError saying why not."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{what} must be a whole number such as 42, got {value!r}.")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip().removeprefix("#")
        if not text.isascii() or not text.isdigit() or len(text) > 19:
            raise ConfigurationError(
                f"{what} must be a whole number such as 42, got {str(value)[:40]!r}."
            )
        number = int(text)
    if not 1 <= number <= _MAX_NUMBER:
        raise ConfigurationError(f"{what} must be between 1 and {_MAX_NUMBER}, got {number}.")
    return number


def _checked(value: str | None, what: str, limit: int) -> str | None:
    if value is None or value == "":
        return None
    problem = text_problem(value)
    if problem is not None:
        raise ConfigurationError(f"The {what} filter {problem}.")
    if len(value) > limit:
        raise ConfigurationError(
            f"The {what} filter is {len(value)} characters long; no event has one longer "
            f"than {limit}."
        )
    return value


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events to list, newest first: ``name`` and ``event_id`` match exactly;
    ``before`` is the paging cursor (the last event number of the previous page)."""

    name: str | None = None
    event_id: str | None = None
    before: int | None = None
    limit: int = 50

    @classmethod
    def build(
        cls,
        *,
        name: str | None = None,
        event_id: str | None = None,
        before: str | int | None = None,
        limit: str | int | None = None,
    ) -> EventFilter:
        """A filter from loosely typed input (query strings, CLI options), checked."""
        cursor = None
        if before not in (None, ""):
            cursor = parse_event_number(before, "The cursor (before)")
        if limit in (None, ""):
            size = 50
        else:
            try:
                size = int(str(limit))
            except ValueError:
                raise ConfigurationError(
                    f"limit must be a whole number, got {str(limit)[:40]!r}"
                ) from None
        if not 1 <= size <= MAX_EVENT_PAGE:
            raise ConfigurationError(f"limit must be between 1 and {MAX_EVENT_PAGE}, got {size}")
        return cls(
            name=_checked((name or "").strip() or None, "event name", MAX_EVENT_NAME),
            event_id=_checked(event_id or None, "sender id", MAX_EVENT_ID),
            before=cursor,
            limit=size,
        )

    def as_query(self) -> dict[str, str]:
        """The filter as query-string parameters (for links to the next page)."""
        out: dict[str, str] = {}
        if self.name:
            out["name"] = self.name
        if self.event_id:
            out["id"] = self.event_id
        if self.limit != 50:
            out["limit"] = str(self.limit)
        return out


@dataclass(frozen=True, slots=True)
class EventPage:
    """A page of events (:class:`~flowkeeper.eventops.EventInfo`) and the cursor to the next."""

    events: list[Any]
    next_before: int | None = None
    query: dict[str, str] = field(default_factory=dict)
