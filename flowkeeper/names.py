"""The rule every name flowkeeper stores follows (workflows, steps, events, topics)."""

from __future__ import annotations


def name_problem(value: object, limit: int) -> str | None:
    """What is wrong with ``value`` as a stored, displayed name (None: nothing).

    Names are shown in logs, the dashboard and the CLI, and used as keys:
    printable, non-blank, valid Unicode, and at most ``limit`` characters.
    """
    if not isinstance(value, str) or not value.strip():
        return f"must be a non-empty string, got {value!r}"
    if len(value) > limit:
        return f"is longer than the limit of {limit} characters"
    if any(ord(c) < 32 for c in value):
        return "contains control characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate, which is not valid Unicode"
    return None


def shown(value: object) -> str:
    """A name as an error message shows it: quoted, and cut when long."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
