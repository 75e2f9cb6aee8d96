"""Checks on untrusted input where it enters: HTTP bodies, query strings, form fields.

Whatever the endpoint or the dashboard passes on to Postgres has been through
here first, so a request Postgres could not store (a NUL character, a lone
UTF-16 surrogate, JSON nested thousands deep, a number Python turns into
infinity) is refused with a 400 that says what is wrong, never sent to the
database to come back as a 503, and never allowed to blow the stack.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from .errors import InvalidRequestError

__all__ = ["MAX_JSON_DEPTH", "MAX_NUMBER_DIGITS", "check_text", "parse_json", "text_problem"]

#: JSON nested deeper than this is refused (Python's parser gives up near 1,000).
MAX_JSON_DEPTH: Final = 256
#: Digits a JSON number may have (Python refuses integers over 4,300 digits).
MAX_NUMBER_DIGITS: Final = 1000


def text_problem(value: str) -> str | None:
    """Why Postgres cannot store ``value`` as text, or None when it can."""
    if "\x00" in value:
        return "contains a NUL character (\\u0000), which Postgres cannot store"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone UTF-16 surrogate (such as \\ud800), which is not valid Unicode"
    return None


def check_text(value: str, what: str, *, max_length: int | None = None) -> str:
    """``value`` unchanged, or InvalidRequestError naming ``what`` and the problem."""
    problem = text_problem(value)
    if problem is not None:
        raise InvalidRequestError(f"{what} {problem}.")
    if max_length is not None and len(value) > max_length:
        raise InvalidRequestError(f"{what} is longer than {max_length} characters.")
    return value


def _constant(name: str) -> Any:
    raise InvalidRequestError(f"The JSON contains {name}, which is not a JSON number.")


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_DIGITS:
        raise InvalidRequestError(f"A JSON number has more than {MAX_NUMBER_DIGITS} digits.")
    value = float(text)
    if not math.isfinite(value):
        raise InvalidRequestError(f"The JSON number {text[:40]} is too large to represent.")
    return value


def _int(text: str) -> int:
    if len(text) > MAX_NUMBER_DIGITS:
        raise InvalidRequestError(f"A JSON number has more than {MAX_NUMBER_DIGITS} digits.")
    return int(text)


def parse_json(raw: bytes | str, *, what: str = "The body") -> Any:
    """Parse untrusted JSON that is to be stored: UTF-8, finite numbers, bounded
    nesting, and strings (keys too) free of NUL and lone surrogates.

    Raises :class:`InvalidRequestError` with the reason.  The common case (a
    small body without ``\\u`` escapes) costs two byte counts more than
    ``json.loads``.
    """
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(f"{what} is not valid UTF-8.") from None
    else:
        text = raw
    try:
        data = json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except RecursionError:
        raise InvalidRequestError(
            f"{what} is JSON nested deeper than {MAX_JSON_DEPTH} levels."
        ) from None
    except InvalidRequestError:
        raise
    except ValueError:
        raise InvalidRequestError(f"{what} is not valid JSON.") from None
    # Raw NUL and surrogate code points cannot survive strict UTF-8 decoding and
    # the JSON grammar: only \u escapes make them, and only brackets nest.
    if "\\u" in text or text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        _check_tree(data, what)
    return data


def _check_tree(data: Any, what: str) -> None:
    stack: list[tuple[Any, int, str]] = [(data, 0, "")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            problem = text_problem(value)
            if problem is not None:
                place = f" at {where}" if where else ""
                raise InvalidRequestError(f"{what} has a string{place} that {problem}.")
        elif isinstance(value, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidRequestError(
                    f"{what} is JSON nested deeper than {MAX_JSON_DEPTH} levels."
                )
            if isinstance(value, dict):
                for key, item in value.items():
                    name = f"{where}.{key}" if where else str(key)
                    stack.append((key, depth + 1, f"{name} (a key)"))
                    stack.append((item, depth + 1, name))
            else:
                stack.extend((item, depth + 1, f"{where}[{i}]") for i, item in enumerate(value))
