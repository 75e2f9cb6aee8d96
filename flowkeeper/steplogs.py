"""Step logs: what a run's code logs (through any logger, or print) kept with the run.

A log record created while a run executes (in a step, or in the workflow
function between steps) is captured with the run id, the step key and the
attempt, and stored in ``step_logs``; the dashboard shows the lines under
their step and ``flowkeeper runs show --logs`` prints them.

Capture goes through the log-record factory, not a handler on the root
logger, so it changes nothing about how the application's own handlers work
(``logging.basicConfig`` still configures them).  It follows logging's levels:
a record the logger does not create (``logger.info`` under a WARNING root) is
not captured either; set the level you want kept, e.g.
``logging.basicConfig(level=logging.INFO)``, and ``step_log_level`` (INFO by
default) for what is stored.

Bounded: at most ``step_log_bytes`` (64 KiB) of messages per step per
invocation and ``run_log_bytes`` (1 MiB) per run; past a cap one line says
how many records were dropped, and the rest are counted, not formatted.
``capture_print=True`` also keeps what ``print()`` writes inside a run (it
still reaches stdout).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from .errors import DatabaseError
from .observe import SCOPE, Attempt, Invocation, Observer
from .serialization import clean_text

if TYPE_CHECKING:
    from .engine import SegmentResult
    from .store import Store

logger = logging.getLogger("flowkeeper")

#: The longest single message kept (longer ones are cut, saying so).
MAX_MESSAGE = 8_000
_STATE_KEY = "flowkeeper.steplogs"


@dataclass(frozen=True, slots=True)
class LogLine:
    """One captured line of a run."""

    id: int
    at: datetime
    level: str
    logger: str
    message: str
    step: str | None
    attempt: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "level": self.level,
            "logger": self.logger,
            "message": self.message,
            "step": self.step,
            "attempt": self.attempt,
        }


Row = tuple[str | None, int | None, int, str, str, datetime]


class _Buffer:
    """The lines one invocation captured and has not stored yet (thread-safe)."""

    def __init__(self, level: int, step_bytes: int) -> None:
        self.level = level
        self.step_bytes = step_bytes
        self.lock = threading.Lock()
        self.rows: list[Row] = []
        self.used: dict[str | None, int] = {}
        self.dropped: dict[tuple[str | None, int | None], list[int]] = {}
        #: Called (from any thread) when a line arrives in an empty buffer.
        self.on_first: Callable[[], None] | None = None

    def add(self, step: str | None, attempt: int | None, record: logging.LogRecord) -> None:
        with self.lock:
            used = self.used.get(step, 0)
            if used >= self.step_bytes:
                drop = self.dropped.setdefault((step, attempt), [0, 0])
                drop[0] += 1
                return
        message = _message(record)
        with self.lock:
            used = self.used.get(step, 0)
            if used + len(message) > self.step_bytes:
                room = max(0, self.step_bytes - used)
                drop = self.dropped.setdefault((step, attempt), [0, 0])
                drop[0] += 1
                drop[1] += len(message) - room
                message = message[:room] + " …[cut]" if room > 200 else ""
                self.used[step] = self.step_bytes
                if not message:
                    return
            else:
                self.used[step] = used + len(message)
            first = not self.rows
            self.rows.append(
                (
                    step,
                    attempt,
                    record.levelno,
                    clean_text(record.name)[:200],
                    message,
                    datetime.fromtimestamp(record.created, UTC),
                )
            )
        if first and self.on_first is not None:
            self.on_first()

    def take(self, final: set[tuple[str | None, int | None]] | None) -> list[Row]:
        """The lines to store, and a note for each step in ``final`` whose lines were capped.

        ``final`` None: every step (the invocation is over).
        """
        with self.lock:
            rows, self.rows = self.rows, []
            done = [k for k in self.dropped if final is None or k in final]
            for step, attempt in done:
                count, cut = self.dropped.pop((step, attempt))
                what = f"step {step!r}" if step else "the workflow function"
                rows.append(
                    (
                        step,
                        attempt,
                        logging.WARNING,
                        "flowkeeper",
                        f"[flowkeeper] {count} log record(s) of {what} not kept: over the cap "
                        f"of {self.step_bytes} bytes of logs per step"
                        + (f" ({cut} characters cut)" if cut else "")
                        + "; see FlowKeeper(step_log_bytes=...).",
                        datetime.now(UTC),
                    )
                )
            return rows


def _message(record: logging.LogRecord) -> str:
    try:
        text = record.getMessage()
    except Exception as exc:  # a bad format string or argument
        text = f"{record.msg!r} (formatting failed: {type(exc).__name__})"
    if record.exc_info and record.exc_info[1] is not None:
        with contextlib.suppress(Exception):
            text += "\n" + logging.Formatter().formatException(record.exc_info)
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 40] + f" …[{len(text) - MAX_MESSAGE + 40} characters cut]"
    return clean_text(text)


# capture ------------------------------------------------------------------------------
_installed = False
_install_lock = threading.Lock()


def _buffer() -> tuple[_Buffer, str | None, int | None] | None:
    scope = SCOPE.get()
    if scope is None:
        return None
    buffer = scope.invocation.state.get(_STATE_KEY)
    if buffer is None:
        return None
    return buffer, scope.step, scope.attempt


def _install_factory() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            found = _buffer()
            if found is not None and record.levelno >= found[0].level:
                # Never let capture break the user's logging call.
                with contextlib.suppress(Exception):
                    found[0].add(found[1], found[2], record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


class _PrintTee:
    """sys.stdout, also keeping what is printed inside a run."""

    def __init__(self, real: TextIO) -> None:
        self._real = real

    def write(self, text: str) -> int:
        written = self._real.write(text)
        found = _buffer()
        if found is not None and text.strip():
            record = logging.LogRecord("print", logging.INFO, "", 0, text.rstrip("\n"), None, None)
            with contextlib.suppress(Exception):
                found[0].add(found[1], found[2], record)
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _install_print() -> None:
    with _install_lock:
        if not isinstance(sys.stdout, _PrintTee):
            sys.stdout = _PrintTee(sys.stdout)


class StepLogs(Observer):
    """The observer that captures and stores a run's log lines."""

    def __init__(
        self,
        store: Store,
        *,
        level: int | str = logging.INFO,
        step_bytes: int = 64 * 1024,
        run_bytes: int = 1024 * 1024,
        capture_print: bool = False,
    ) -> None:
        self.store = store
        self.level = logging._checkLevel(level)  # type: ignore[attr-defined]
        self.step_bytes = step_bytes
        self.run_bytes = run_bytes
        self._flushes: dict[str, asyncio.Task[None]] = {}
        self.capture_print = capture_print
        #: Seconds after the first line of a batch until it is stored, even mid-step.
        self.live_delay = 0.5
        _install_factory()

    async def invocation_started(self, inv: Invocation) -> None:
        buffer = _Buffer(self.level, self.step_bytes)
        inv.state[_STATE_KEY] = buffer
        loop = asyncio.get_running_loop()

        def soon() -> None:  # lines of a long step are stored while it runs (and if it dies)
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(
                    self._later, inv, buffer, loop, context=contextvars.Context()
                )

        buffer.on_first = soon
        if self.capture_print and not isinstance(sys.stdout, _PrintTee):
            _install_print()  # again if something replaced sys.stdout since

    def attempt_ended(self, inv: Invocation, attempt: Attempt, error: BaseException | None) -> None:
        buffer: _Buffer | None = inv.state.get(_STATE_KEY)
        if buffer is None or not (buffer.rows or buffer.dropped):
            return
        # Stored in the background: the step's result need not wait for its logs.
        previous = self._flushes.get(inv.run_id)
        final: set[tuple[str | None, int | None]] = {(attempt.key, attempt.attempt)}
        task = asyncio.get_running_loop().create_task(self._flush(inv, buffer, previous, final))
        self._flushes[inv.run_id] = task
        task.add_done_callback(lambda t: self._done(inv.run_id, t))

    def _later(self, inv: Invocation, buffer: _Buffer, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_later(
            self.live_delay, self._flush_now, inv, buffer, context=contextvars.Context()
        )

    def _flush_now(self, inv: Invocation, buffer: _Buffer) -> None:
        if inv.state.get(_STATE_KEY) is not buffer or not buffer.rows:
            return  # the invocation ended (its last flush took the lines) or nothing new
        previous = self._flushes.get(inv.run_id)
        task = asyncio.get_running_loop().create_task(self._flush(inv, buffer, previous, set()))
        self._flushes[inv.run_id] = task
        task.add_done_callback(lambda t: self._done(inv.run_id, t))

    def _done(self, run_id: str, task: asyncio.Task[None]) -> None:
        if self._flushes.get(run_id) is task:
            del self._flushes[run_id]

    async def invocation_ended(
        self, inv: Invocation, result: SegmentResult | None, error: BaseException | None
    ) -> None:
        buffer: _Buffer | None = inv.state.pop(_STATE_KEY, None)
        if buffer is None:
            return
        # The callback holds the buffer that holds it: break the cycle, or every
        # invocation would leave its state for the garbage collector to find.
        buffer.on_first = None
        await self._flush(inv, buffer, self._flushes.get(inv.run_id), None)

    async def _flush(
        self,
        inv: Invocation,
        buffer: _Buffer,
        previous: asyncio.Task[None] | None,
        final: set[tuple[str | None, int | None]] | None,
    ) -> None:
        if previous is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(previous)
        rows = buffer.take(final)
        if not rows:
            return
        try:
            await self.store.step_logs_append(inv.run_id, rows, self.run_bytes)
        except DatabaseError as exc:
            # Logged outside the capture: this line must not feed the next flush.
            token = SCOPE.set(None)
            try:
                logger.warning("run %s: %d log line(s) not stored: %s", inv.run_id, len(rows), exc)
            finally:
                SCOPE.reset(token)


async def read(store: Store, run_id: str, *, limit: int = 5000) -> list[LogLine]:
    """A run's stored log lines, oldest first."""
    rows = await store.step_logs_read(run_id, limit)
    return [
        LogLine(
            id=r["id"],
            at=r["at"],
            level=logging.getLevelName(r["level"]),
            logger=r["logger"],
            message=r["message"],
            step=r["step_key"],
            attempt=r["attempt"],
        )
        for r in rows
    ]
