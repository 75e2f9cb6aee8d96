"""Retry policies: how often a failing step is tried again, and when.

Every delay a policy returns is finite and within ``[0, max_delay]``: it
becomes ``now() + interval`` in Postgres, where an infinite, NaN or
astronomically large value would crash the engine or park the run for ever.
Nonsense is refused where it is written (``RetryPolicy(...)``,
``RetryAfterError(delay=...)``); a third-party exception's ``retry_after``
that is not a usable delay is ignored with a warning, and the backoff applies.
"""

from __future__ import annotations

import logging
import math
import numbers
import random
import reprlib
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from .errors import NonRetriableError, RetryAfterError

logger = logging.getLogger("flowkeeper")

#: The longest retry delay a policy may allow (``max_delay``), in seconds: a year.
LONGEST_DELAY = 366 * 24 * 3600.0


def _finite_field(name: str, value: Any) -> float:
    """A RetryPolicy field as a float, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | Decimal):
        raise TypeError(f"RetryPolicy.{name} must be a number (seconds), got {value!r}")
    try:
        number = float(value)
    except (OverflowError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"RetryPolicy.{name} must be a finite number, got {value!r}")
    return number


def _safe_repr(value: Any) -> str:
    try:
        return reprlib.repr(value)
    except Exception:
        return f"<{type(value).__qualname__} object>"


def requested_seconds(value: Any) -> float:
    """A requested delay (seconds, a timedelta, a numeric string) as finite seconds ≥ 0.

    Raises TypeError or ValueError, with the reason, for anything else.
    """
    if isinstance(value, bool):
        raise TypeError("a bool is not a delay")
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, str):
        seconds = float(value.strip())  # e.g. an HTTP Retry-After header: "120"
    else:
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        except (TypeError, ValueError):
            raise
        except Exception as exc:  # a broken __float__ is the caller's bug, not ours
            raise TypeError(f"float() of it raised {type(exc).__name__}: {exc}") from exc
    if not math.isfinite(seconds):
        raise ValueError(f"{seconds} is not a finite number of seconds")
    if seconds < 0:
        raise ValueError(f"{seconds:g} seconds is negative")
    return seconds


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter.

    The n-th retry waits ``initial_delay * backoff ** (n - 1)`` seconds, capped at
    ``max_delay``, then spread by ``±jitter`` (a fraction) so that many runs
    failing together do not retry together.  ``max_attempts`` counts the first
    try: ``max_attempts=1`` means no retries.  A step may ask for its own delay
    (``RetryAfterError(delay=...)``, or any exception with a ``retry_after``
    attribute); that too is capped at ``max_delay``, which is at most a year.
    """

    max_attempts: int = 5
    initial_delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int):
            raise TypeError(f"RetryPolicy.max_attempts must be an integer, got {attempts!r}")
        if attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")
        for name in ("initial_delay", "backoff", "max_delay", "jitter"):
            object.__setattr__(self, name, _finite_field(name, getattr(self, name)))
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy delays must not be negative")
        if self.max_delay > LONGEST_DELAY:
            raise ValueError(
                f"RetryPolicy.max_delay must be at most {LONGEST_DELAY:g} seconds (a year), "
                f"got {self.max_delay:g}"
            )
        if self.backoff < 1:
            raise ValueError("RetryPolicy.backoff must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("RetryPolicy.jitter must be between 0 and 1")

    @classmethod
    def none(cls) -> RetryPolicy:
        """A policy that never retries."""
        return cls(max_attempts=1)

    def delay_for(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if self.initial_delay == 0:
            base = 0.0
        else:
            try:
                grown = self.initial_delay * self.backoff ** max(0, attempt - 1)
            except OverflowError:  # a float power past 1.8e308: long since capped
                grown = math.inf
            base = min(self.max_delay, grown)
        if self.jitter:
            spread = (rng or random).uniform(-self.jitter, self.jitter)
            base = base * (1 + spread)
        return float(max(0.0, min(base, self.max_delay)))

    def should_retry(self, attempt: int, error: BaseException) -> bool:
        """Whether a step that failed on ``attempt`` with ``error`` is tried again."""
        if isinstance(error, NonRetriableError):
            return False
        return attempt < self.max_attempts

    def next_delay(self, attempt: int, error: BaseException) -> float:
        """The wait before the next attempt; an error may ask for its own (capped) delay."""
        requested = _requested_delay(error)
        if requested is not None:
            return float(min(requested, self.max_delay))
        return self.delay_for(attempt)


def _requested_delay(error: BaseException) -> float | None:
    """The delay ``error`` asks for, or None (none asked, or not a usable one)."""
    attribute = "delay" if isinstance(error, RetryAfterError) else "retry_after"
    try:
        value = getattr(error, attribute, None)
    except Exception as exc:  # a property that raises: the step's bug, not the engine's
        _ignored(error, attribute, "<unreadable>", f"reading it raised {type(exc).__name__}")
        return None
    if value is None:
        return None
    try:
        return requested_seconds(value)
    except Exception as exc:
        _ignored(error, attribute, _safe_repr(value), str(exc))
        return None


def _ignored(error: BaseException, attribute: str, shown: str, reason: str) -> None:
    logger.warning(
        "%s.%s = %s is not a usable retry delay (%s); ignored, the retry policy's backoff applies",
        type(error).__qualname__,
        attribute,
        shown,
        reason,
    )


DEFAULT_RETRY = RetryPolicy()
