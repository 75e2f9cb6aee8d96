"""Run ids: UUIDv7 (RFC 9562), time-ordered so new runs sort last."""

from __future__ import annotations

import os
import time
import uuid

from .errors import InvalidInputError, RunNotFoundError


def new_run_id() -> str:
    """A UUIDv7 string: 48 bits of Unix milliseconds, then random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def check_run_id(run_id: str) -> str:
    """A run id in canonical form; anything that is not a UUID names no run."""
    try:
        return str(uuid.UUID(str(run_id)))
    except ValueError:
        raise RunNotFoundError(str(run_id)) from None


MAX_IDEMPOTENCY_KEY = 512


def check_idempotency_key(key: object, workflow: str) -> str | None:
    """An idempotency key as stored: a string Postgres can hold, or None.

    Refused with :class:`InvalidInputError` (nothing is created): NUL
    characters and lone surrogates, which Postgres cannot store in text, an
    empty key, and keys longer than 512 characters.
    """
    if key is None:
        return None
    text = key if isinstance(key, str) else str(key)
    problem = None
    if not text:
        problem = "is empty; pass None for no key"
    elif len(text) > MAX_IDEMPOTENCY_KEY:
        problem = f"is {len(text)} characters long; the limit is {MAX_IDEMPOTENCY_KEY} (hash it)"
    elif "\x00" in text:
        problem = "contains a NUL character, which Postgres cannot store in text"
    else:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            problem = "contains a lone surrogate, which is not valid Unicode text"
    if problem is not None:
        raise InvalidInputError(workflow, f"The idempotency key {text[:60]!r} {problem}.")
    return text
