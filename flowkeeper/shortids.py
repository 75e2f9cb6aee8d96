"""Short run ids, as the dashboard and ``runs list`` display them.

``0193f1c2``, ``0193f1c2-7a4b`` (a unique prefix of at least 6 hex digits) or
``0193f1c2…9e1d`` / ``0193f1c2...9e1d`` (the first and the last digits) all
name a run when exactly one run matches; a full id is taken as it is.
"""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

from .errors import RunNotFoundError
from .ids import check_run_id

if TYPE_CHECKING:
    from .store import Store

_SHORT = re.compile(r"^([0-9a-f-]{6,36}?)(?:(?:…|\.\.\.)([0-9a-f-]{1,12}))?$")
MIN_DIGITS = 6


class AmbiguousRunIdError(RunNotFoundError):
    """A short id that more than one run starts with."""

    def __init__(self, short: str, matches: list[str]) -> None:
        super().__init__(short)
        self.matches = matches
        shown = ", ".join(matches[:2]) + (", ..." if len(matches) > 2 else "")
        self.args = (
            f"{short!r} matches more than one run ({shown}): give more of the id, "
            "or the first and last digits as the dashboard shows them (0193f1c2…9e1d).",
        )


def _digits(text: str) -> str:
    return text.replace("-", "")


def _pad(digits: str, fill: str) -> uuid.UUID:
    return uuid.UUID(hex=digits + fill * (32 - len(digits)))


async def resolve_run_id(store: Store, text: str) -> str:
    """The full id of the one run ``text`` names (see the module doc)."""
    raw = text.strip().lower()
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        pass
    m = _SHORT.match(raw)
    if m is None or len(_digits(m.group(1))) < MIN_DIGITS or len(_digits(raw)) > 32:
        check_run_id(text)  # raises RunNotFoundError with the text as given
    assert m is not None
    prefix = _digits(m.group(1))
    suffix = _digits(m.group(2) or "")
    # The canonical text form has dashes after the 8th, 12th, 16th and 20th digit.
    canon_prefix = str(_pad(prefix, "0"))[
        : len(prefix) + sum(len(prefix) > n for n in (8, 12, 16, 20))
    ]
    pattern = canon_prefix + "%" + _dashed_suffix(suffix)
    matches = await store.run_ids_like(_pad(prefix, "0"), _pad(prefix, "f"), pattern)
    if not matches:
        raise RunNotFoundError(text)
    if len(matches) > 1:
        raise AmbiguousRunIdError(text, matches)
    return matches[0]


def _dashed_suffix(suffix: str) -> str:
    """The last digits of an id as they appear in its text form (dashes put back)."""
    if not suffix:
        return ""
    tail = str(uuid.UUID(hex="0" * (32 - len(suffix)) + suffix))
    digits = 0
    i = len(tail)
    while digits < len(suffix):
        i -= 1
        if tail[i] != "-":
            digits += 1
    return tail[i:]
