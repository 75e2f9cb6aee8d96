"""Exceptions raised by flowkeeper.

Every exception the library raises on purpose derives from ``FlowKeeperError``,
so ``except FlowKeeperError`` catches them all.  Messages say what went wrong
and what to do about it.

    FlowKeeperError
    ├── ConfigurationError        bad settings given to FlowKeeper(...) or the CLI
    │   └── CodecKeyError         an encryption key of the wrong length or form
    ├── DecryptionError           a sealed value whose key is gone, or that was altered
    ├── DatabaseError             Postgres unreachable (transient: the run comes back)
    │   └── MigrationError        the schema could not be brought up to date
    ├── DatabaseRefusedError      Postgres refused a value for good (also a ValueError)
    ├── WorkflowError
    │   ├── UnknownWorkflowError  a name nobody registered in this process
    │   ├── DuplicateWorkflowError
    │   ├── InvalidInputError     input refused by the workflow's pydantic annotation
    │   ├── SerializationError    a step result or output that cannot be stored as JSON
    │   ├── DeterminismError      the code's steps no longer match the recorded history
    │   └── StepUsageError        a Context method used the wrong way
    ├── StepFailedError           a step exhausted its retries (raised inside the workflow)
    │   └── ChildFailedError      a child run failed or was cancelled (ctx.invoke...)
    │       └── ChildTimeoutError a child run did not finish within the wait's timeout
    ├── StepTimeoutError          a step ran longer than its timeout (also a TimeoutError)
    ├── AttemptLostError          a step's invocation died during the step, too often
    ├── NonRetriableError         raise it from a step to fail it at once
    │   └── TransactionError      ctx.transaction used the wrong way (never retried)
    │       ├── TransactionDatabaseError  its connection does not reach flowkeeper's schema
    │       └── TransactionUsageError     its function misbehaved (sync, or left the transaction)
    ├── RetryAfterError           raise it from a step to ask for a specific retry delay
    ├── InvalidEventError         an event or a wait's match that cannot be sent or matched
    ├── TokenError                completing an approval token failed
    │   ├── TokenNotFoundError    no such token (or a forged URL)          HTTP 404
    │   ├── TokenCompletedError   the token was completed already          HTTP 409
    │   └── TokenExpiredError     the token's time is up                   HTTP 410
    ├── StreamTokenError          a stream read token missing, forged, for another run or expired
    ├── RunNotFoundError
    ├── EventNotFoundError        no event with this number (never sent, or pruned)
    ├── RunStateError             an action the run's status does not allow (replay a live run)
    ├── RunFailedError            fk.result() on a run that failed
    ├── RunCancelledError         fk.result() on a run that was cancelled
    ├── RunTimeoutError           fk.result() gave up waiting (also a TimeoutError); as a
    │                             run's error: it passed its timeout or start_timeout
    ├── ScheduleNotFoundError     no cron schedule stored for that workflow
    ├── SignatureError            a request without a valid signature (HTTP 401)
    ├── InvalidRequestError       a malformed request to the endpoint or dashboard (HTTP 400)
    └── DispatchError             the endpoint could not be reached or refused an invocation
"""

from __future__ import annotations

import math
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any


class FlowKeeperError(Exception):
    """Base class of every error flowkeeper raises on purpose."""


class ConfigurationError(FlowKeeperError):
    """A setting given to FlowKeeper (or the CLI) is missing or malformed."""


class CodecKeyError(ConfigurationError):
    """An encryption key that cannot be used (wrong length, not bytes or base64)."""


class DecryptionError(FlowKeeperError):
    """A sealed value could not be opened: its key is not configured, or it was altered."""


class DatabaseError(FlowKeeperError):
    """Postgres could not be reached, or refused a flowkeeper query."""


class MigrationError(DatabaseError):
    """The flowkeeper schema could not be created or upgraded."""


class DatabaseRefusedError(FlowKeeperError, ValueError):
    """Postgres refused a value for a reason that will not change on retry.

    A data exception or an integrity violation (SQLSTATE classes 22 and 23), or
    a value the driver cannot encode: unlike :class:`DatabaseError` it is never
    retried, and reaches the caller (or fails the step) with this message.
    """

    def __init__(self, query: str, sqlstate: str | None, detail: str) -> None:
        self.query = query
        self.sqlstate = sqlstate
        code = f" (SQLSTATE {sqlstate})" if sqlstate else ""
        super().__init__(
            f"Postgres refused a value in flowkeeper's {query} query{code}: {detail}. "
            "Retrying cannot help: the value itself must change (NUL characters, lone "
            "surrogates and NaN/Infinity cannot be stored)."
        )


class WorkflowError(FlowKeeperError):
    """A problem with a workflow definition or with how it is used."""


class UnknownWorkflowError(WorkflowError):
    """No workflow of this name is registered in this process."""

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        self.name = name
        hint = f" Registered here: {', '.join(sorted(known))}." if known else ""
        super().__init__(
            f"No workflow named {name!r} is registered in this process.{hint} "
            "Import the module that defines it (with @fk.workflow or fk.register) "
            "before triggering or serving it."
        )


class DuplicateWorkflowError(WorkflowError):
    """Two different functions were registered under one name."""


class InvalidInputError(WorkflowError, ValueError):
    """The input given to trigger() does not match the workflow's annotation."""

    def __init__(self, workflow: str, detail: str) -> None:
        self.workflow = workflow
        self.detail = detail
        super().__init__(
            f"Input for workflow {workflow!r} is invalid; no run was created.\n{detail}"
        )


class SerializationError(WorkflowError, TypeError):
    """A value that flowkeeper must store is not JSON-serialisable."""


class DeterminismError(WorkflowError):
    """The workflow's code no longer matches the run's recorded history.

    Raised (and recorded as the run's error) when a recorded step was renamed,
    removed or moved.  Nothing recorded is executed again.
    """

    def __init__(self, message: str, *, step: str | None, position: int) -> None:
        self.step = step
        self.position = position
        super().__init__(message)


class StepUsageError(WorkflowError):
    """A Context method was used in a way flowkeeper cannot record durably."""


class StepFailedError(FlowKeeperError):
    """A step failed for good (retries exhausted or a NonRetriableError).

    It is raised inside the workflow function where the step was awaited, the
    same way on the first execution and on every replay, so a workflow may catch
    it (to compensate) deterministically.  Uncaught, it fails the run with the
    step's original error type, message and traceback.
    """

    def __init__(
        self,
        step: str,
        error_type: str,
        message: str,
        traceback: str | None = None,
        attempts: int = 1,
    ) -> None:
        self.step = step
        self.error_type = error_type
        self.message = message
        self.traceback = traceback
        self.attempts = attempts
        plural = "s" if attempts != 1 else ""
        super().__init__(
            f"Step {step!r} failed after {attempts} attempt{plural}: {error_type}: {message}"
        )


class ChildFailedError(StepFailedError):
    """A child run (ctx.invoke, ctx.wait_for_children) failed or was cancelled.

    Raised in the parent where it waits; ``child_run_id``, ``child_status``
    and ``child_error`` (the child's stored error) say what happened.
    Uncaught, it fails the parent with the child's error type and message.
    """

    def __init__(
        self,
        step: str,
        child_run_id: str,
        workflow: str,
        status: str,
        error: dict[str, Any] | None,
    ) -> None:
        self.child_run_id = child_run_id
        self.child_workflow = workflow
        self.child_status = status
        self.child_error = error
        info = error or {}
        kind = str(info.get("type") or ("Cancelled" if status == "cancelled" else "Error"))
        what = {
            "cancelled": "was cancelled",
            "running": "did not finish in time",
        }.get(status, "failed")
        detail = info.get("message") or ""
        super().__init__(
            step,
            kind,
            f"child run {child_run_id} of workflow {workflow!r} {what}"
            + (f": {detail}" if detail else ""),
            info.get("traceback"),
        )


class ChildTimeoutError(ChildFailedError):
    """A child run did not finish within its wait's ``timeout`` (it goes on running)."""

    def __init__(
        self,
        step: str,
        child_run_id: str,
        workflow: str,
        status: str,
        error: dict[str, Any] | None,
    ) -> None:
        super().__init__(
            step,
            child_run_id,
            workflow,
            status,
            {"type": "flowkeeper.errors.ChildTimeoutError", "message": "the wait timed out"},
        )


class StepTimeoutError(FlowKeeperError, TimeoutError):
    """A step attempt ran longer than the ``timeout`` given to ``ctx.step``.

    The attempt counts as failed and is retried per the retry policy.  An
    async step is cancelled at the timeout.  A sync step cannot be interrupted
    (Python threads cannot be stopped): the attempt is reported as hung at the
    timeout, and its retry starts only once the thread has returned (its late
    result is discarded), so two attempts of one step never overlap.
    """


class AttemptLostError(FlowKeeperError):
    """A step's attempts ended with their invocation (the process was killed, ran out
    of memory, hit its host's time limit or called ``os._exit``) until the retry
    policy gave up.  Each lost attempt counts as an attempt."""


class NonRetriableError(FlowKeeperError):
    """Raise from a step to fail it immediately, without further retries."""


class TransactionError(NonRetriableError):
    """``ctx.transaction`` was used in a way no retry can fix; the step fails at once."""


class TransactionDatabaseError(TransactionError):
    """The connection ``ctx.transaction`` got does not reach the database holding
    flowkeeper's schema and this run: the step's record could not commit with the
    user's writes."""


class TransactionUsageError(TransactionError):
    """The function given to ``ctx.transaction`` is not an async function of an asyncpg
    connection, or it ended, committed or broke the transaction it was given."""


class RetryAfterError(FlowKeeperError):
    """Raise from a step to have it retried after ``delay`` instead of the backoff."""

    def __init__(self, message: str = "", *, delay: float | timedelta) -> None:
        self.delay = _delay_seconds(delay)
        super().__init__(message or f"retry requested after {self.delay:g}s")


def _delay_seconds(delay: object) -> float:
    """``RetryAfterError``'s delay as finite seconds ≥ 0, or a TypeError/ValueError.

    Huge delays are accepted here: the retry policy caps them at its ``max_delay``.
    """
    if isinstance(delay, timedelta):
        seconds = delay.total_seconds()
    elif isinstance(delay, int | float | Decimal | Fraction) and not isinstance(delay, bool):
        try:
            seconds = float(delay)
        except (OverflowError, ValueError):  # an int past 1.8e308, Decimal('sNaN')
            seconds = math.nan
    else:
        raise TypeError(
            f"RetryAfterError delay must be seconds (an int or float) or a timedelta, "
            f"got {type(delay).__name__}"
        )
    if not math.isfinite(seconds):
        raise ValueError(f"RetryAfterError delay must be finite (seconds), got {delay!r}")
    if seconds < 0:
        raise ValueError(f"RetryAfterError delay must not be negative, got {delay!r}")
    return seconds


class InvalidEventError(FlowKeeperError, ValueError):
    """An event that cannot be sent as given (name, id or data), or a wait's match
    that cannot be matched; nothing was stored."""


class TokenError(FlowKeeperError):
    """An approval token could not be completed; ``status`` is the HTTP answer."""

    status = 400

    def __init__(self, token: str, message: str) -> None:
        self.token = token
        super().__init__(message)


class TokenNotFoundError(TokenError):
    """No token with this id exists (or its URL was not signed by this app)."""

    status = 404


class TokenCompletedError(TokenError):
    """The token was completed already: a token completes its wait once."""

    status = 409


class TokenExpiredError(TokenError):
    """The token's timeout is over; its wait returned None."""

    status = 410


class StreamTokenError(FlowKeeperError):
    """A stream read token that does not allow reading this run's stream now (HTTP 401)."""


class RunNotFoundError(FlowKeeperError):
    """No run with this id exists (in this schema)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"No run with id {run_id!r} exists.")


class EventNotFoundError(FlowKeeperError):
    """No event with this number exists (in this schema): never sent, or pruned."""

    def __init__(self, number: int) -> None:
        self.number = number
        super().__init__(
            f"No event number {number} exists: it was never sent, or it was pruned after "
            "event_retention. `flowkeeper events list` shows the events there are."
        )


class RunStateError(FlowKeeperError):
    """The run's status does not allow this action (replaying a live run, cancelling a
    finished one); the message says what would."""

    def __init__(self, run_id: str, status: str | None, message: str) -> None:
        self.run_id = run_id
        self.status = status
        super().__init__(message)


class RunFailedError(FlowKeeperError):
    """The awaited run ended in the ``failed`` state."""

    def __init__(self, run_id: str, error: dict[str, Any] | None) -> None:
        self.run_id = run_id
        self.error = error or {}
        self.error_type = str(self.error.get("type", "Error"))
        self.error_message = str(self.error.get("message", ""))
        super().__init__(f"Run {run_id} failed: {self.error_type}: {self.error_message}")


class RunCancelledError(FlowKeeperError):
    """The awaited run was cancelled."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"Run {run_id} was cancelled.")


class RunTimeoutError(FlowKeeperError, TimeoutError):
    """fk.result() stopped waiting before the run finished (the run goes on).

    Also the error type of a run failed by its workflow's ``timeout`` or
    ``start_timeout``: its message names which deadline passed and when.
    """


class ScheduleNotFoundError(FlowKeeperError, LookupError):
    """No cron schedule is stored for that workflow (or it was removed from the code)."""


class SignatureError(FlowKeeperError):
    """A request's signature is missing, malformed, tampered, expired or unknown."""

    def __init__(self, message: str, *, code: str = "invalid_signature") -> None:
        self.code = code
        super().__init__(message)


class InvalidRequestError(FlowKeeperError, ValueError):
    """A request to the endpoint or the dashboard is malformed: answered with HTTP 400.

    The message says what is wrong with it (not JSON, nested too deep, a NUL
    character Postgres cannot store, an absurd number) so the sender can fix it.
    """


class DispatchError(FlowKeeperError):
    """An invocation could not be delivered to the endpoint."""
