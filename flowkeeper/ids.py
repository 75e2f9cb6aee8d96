"""Run ids: UUIDv7 (RFC 9562), time-ordered so new runs sort last."""

from __future__ import annotations

import os
import time
import uuid

from .errors import RunNotFoundError


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
