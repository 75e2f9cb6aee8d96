"""The wait operations of a run: for an event, for an approval token.

A wait is an entry of the run's history (kind ``wait``) like a step or a
sleep, keyed by name with occurrence numbers.  Started, it is registered in
one statement that also looks back for what it waits for (an event sent since
the lookback start, a token already completed): found, the wait returns at
once; not found, the run is suspended until it is resolved or times out, with
no invocation held.  Replayed, it returns what was recorded.  Whatever
resolves it writes the payload into the history entry and makes the run due
in the same transaction, so every driver resumes it like a sleep.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from . import serialization
from .errors import StepUsageError
from .events import Match, check_event_name

if TYPE_CHECKING:
    from .engine import Execution
    from .store import HistoryEntry
    from .tokens import Token


@dataclass(frozen=True, slots=True)
class WaitSpec:
    """What a new wait waits for (built and checked before anything is recorded)."""

    kind: str  # "event" | "token"
    event: str | None = None
    match: Match | None = None
    token_id: str | None = None  # the raw id
    timeout: timedelta | None = None
    expires_at: datetime | None = None  # a token's own expiry
    lookback: timedelta | None = None  # None: since the run started
    model: Any = None


def event_spec(
    event: str,
    match: dict[str, Any] | None,
    timeout: timedelta | float | None,
    lookback: timedelta | float | None,
    model: Any,
) -> WaitSpec:
    try:
        check_event_name(event)
    except ValueError as exc:
        raise StepUsageError(str(exc)) from None
    return WaitSpec(
        kind="event",
        event=event,
        match=Match.build(match, model),
        timeout=_duration(timeout, "timeout"),
        lookback=_duration(lookback, "lookback"),
        model=model,
    )


def token_spec(token: Token, timeout: timedelta | float | None, model: Any, raw: str) -> WaitSpec:
    return WaitSpec(
        kind="token",
        token_id=raw,
        timeout=_duration(timeout, "timeout"),
        expires_at=token.expires_at,
        model=model,
    )


def _duration(value: timedelta | float | None, what: str) -> timedelta | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | timedelta):
        raise StepUsageError(f"{what} must be a timedelta or seconds, got {value!r}")
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not 0 <= seconds < 100 * 365 * 86400:
        raise StepUsageError(f"{what} must be between 0 and 100 years, got {value!r}")
    return timedelta(seconds=seconds)


def _restore(execution: Execution, key: str, payload: str | None, model: Any) -> Any:
    sealer = execution.store.sealer  # flowkeeper.codec
    payload = execution.unsealed(f"wait {key!r}", lambda: sealer.open_json(payload))
    return serialization.loads(payload, model, None, what=f"The payload that resolved wait {key!r}")


async def wait(execution: Execution, name: str, spec: WaitSpec) -> Any:
    """Run one wait operation (new or replayed) in ``execution``."""
    from .engine import Outcome, _Suspend

    key, position, entry = execution._next(name, "wait")
    try:
        if entry is not None:
            return await _replayed(execution, key, entry, spec)
        await execution._before_new_work()
        now = execution.db_time()
        expires = now + spec.timeout if spec.timeout is not None else None
        if spec.expires_at is not None and (expires is None or spec.expires_at < expires):
            expires = spec.expires_at
        if spec.lookback is not None:
            lookback = now - spec.lookback
        else:
            lookback = execution.claimed.created_at or now
        match = spec.match or Match([], [], {})
        try:
            outcome, payload, _ = await execution.store.register_wait(
                execution.run_id,
                execution.token,
                key=key,
                position=position,
                name=name,
                kind=spec.kind,
                event=spec.event,
                paths=match.paths,
                values=match.values,
                match=match.given if spec.kind == "event" else None,
                containment=match.containment,
                token_id=spec.token_id,
                lookback=lookback,
                expires=expires,
                started=now,
            )
        except Exception as exc:
            raise execution._database_failure(exc) from exc
        if outcome == "lost":
            raise _Suspend(await execution._lost())
        if outcome == "resolved":
            return _restore(execution, key, payload, spec.model)
        raise _Suspend(execution._segment(Outcome.WAITING, due_at=expires))
    finally:
        execution._busy = None


async def _replayed(execution: Execution, key: str, entry: HistoryEntry, spec: WaitSpec) -> Any:
    from .engine import Outcome, _Suspend

    if entry.status == "completed":
        return _restore(execution, key, entry.output, spec.model)
    if entry.status == "timed_out":
        return None
    # Recorded, still waiting when this invocation claimed the run: resolved
    # meanwhile, timed out now, or waiting again.
    await execution._before_new_work()
    time_up = entry.wake_at is not None and execution.db_time() >= entry.wake_at
    try:
        status, payload = await execution.store.resume_wait(
            execution.run_id, execution.token, key, time_up=time_up
        )
    except Exception as exc:
        raise execution._database_failure(exc) from exc
    if status == "lost":
        raise _Suspend(await execution._lost())
    if status == "completed":
        return _restore(execution, key, payload, spec.model)
    if status == "timed_out":
        return None
    raise _Suspend(execution._segment(Outcome.WAITING, due_at=entry.wake_at))
