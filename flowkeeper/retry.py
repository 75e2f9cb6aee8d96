"""Retry policies: how often a failing step is tried again, and when."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

from .errors import NonRetriableError, RetryAfterError


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter.

    The n-th retry waits ``initial_delay * backoff ** (n - 1)`` seconds, capped at
    ``max_delay``, then spread by ``±jitter`` (a fraction) so that many runs
    failing together do not retry together.  ``max_attempts`` counts the first
    try: ``max_attempts=1`` means no retries.
    """

    max_attempts: int = 5
    initial_delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy delays must not be negative")
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
        base = min(self.max_delay, self.initial_delay * self.backoff ** max(0, attempt - 1))
        if self.jitter:
            spread = (rng or random).uniform(-self.jitter, self.jitter)
            base = base * (1 + spread)
        return max(0.0, min(base, self.max_delay))

    def should_retry(self, attempt: int, error: BaseException) -> bool:
        """Whether a step that failed on ``attempt`` with ``error`` is tried again."""
        if isinstance(error, NonRetriableError):
            return False
        return attempt < self.max_attempts

    def next_delay(self, attempt: int, error: BaseException) -> float:
        """The wait before the next attempt; an error may ask for its own delay."""
        if isinstance(error, RetryAfterError):
            return error.delay
        requested = getattr(error, "retry_after", None)
        if isinstance(requested, int | float | timedelta) and not isinstance(requested, bool):
            return max(0.0, _seconds(requested))
        return self.delay_for(attempt)


DEFAULT_RETRY = RetryPolicy()
