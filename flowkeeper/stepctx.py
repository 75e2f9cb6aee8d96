"""What a step body knows about itself: its run, its key, its attempt, its idempotency key.

A step's body runs with :class:`StepContext` set in a context variable (sync
steps get it too: their thread runs in a copy of the caller's context), so
``ctx.idempotency_key`` and :func:`current_step` answer inside the body,
also in parallel branches, each of which has its own context.

The idempotency key is derived only from the run id and the step's key (its
name with the occurrence number a loop gives it): the same on every attempt,
after every crash and on every replay of the run; different for each loop
occurrence and for each run.  It is ASCII, 69 characters, safe in any HTTP
header (Stripe allows 255).
"""

from __future__ import annotations

import contextvars
import hashlib
from dataclasses import dataclass

from .errors import StepUsageError

__all__ = ["StepContext", "current_step", "idempotency_key"]


def idempotency_key(run_id: str, step_key: str) -> str:
    """The stable idempotency key of step ``step_key`` of run ``run_id``."""
    digest = hashlib.sha256(f"{run_id}\x00{step_key}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"{run_id}-{digest[:32]}"


@dataclass(frozen=True, slots=True)
class StepContext:
    """The step whose body is running now."""

    run_id: str
    step_key: str  # e.g. "charge" or, the third time in a loop, "charge#3"
    attempt: int  # 1 on the first attempt

    @property
    def idempotency_key(self) -> str:
        """Stable for (run, step key): pass it to Stripe's ``Idempotency-Key`` and the like."""
        return idempotency_key(self.run_id, self.step_key)


_current: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar(
    "flowkeeper_step", default=None
)


def enter(run_id: str, step_key: str, attempt: int) -> contextvars.Token[StepContext | None]:
    """Mark a step body as running in this context (the engine calls it)."""
    return _current.set(StepContext(run_id, step_key, attempt))


def leave(token: contextvars.Token[StepContext | None]) -> None:
    _current.reset(token)


def current_step() -> StepContext:
    """The step running now; :class:`StepUsageError` outside a step body."""
    step = _current.get()
    if step is None:
        raise StepUsageError(
            "There is no step running here: ctx.idempotency_key and current_step() answer "
            "inside a step's function (ctx.step or ctx.transaction), where they are stable "
            "across attempts and replays. In the workflow function itself, use the key in a "
            "step: await ctx.step('charge', charge, order) with charge reading "
            "ctx.idempotency_key."
        )
    return step


def maybe_current() -> StepContext | None:
    return _current.get()
