"""Blocking code in async steps: detect event-loop stalls and name the step.

An ``async`` step that blocks (a sync HTTP call, ``time.sleep``, heavy CPU)
stalls every run the process is executing.  While an async step runs, the
loop beats every ``threshold / 5`` seconds; a watchdog thread that sees a beat
late by more than ``threshold`` notes which task holds the loop, and where
(its innermost frame).  When the loop comes back, one WARNING names the run,
the step, the stall and the place, with the advice, and a ``loop_stall`` event
is recorded on the run's history (the dashboard and ``runs show`` list it).

``FlowKeeper(stall_threshold=0.5)`` (seconds; None turns it off).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import linecache
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from .observe import Attempt, Invocation, Observer

if TYPE_CHECKING:
    from .store import Store

logger = logging.getLogger("flowkeeper")

_PLUMBING = (
    str(Path(__file__).resolve().parent),
    str(Path(asyncio.__file__).resolve().parent),
)
ADVICE = (
    "make it a sync step (def instead of async def: flowkeeper runs sync steps in its own "
    "threads), or use an async library (httpx.AsyncClient, asyncio.sleep, "
    "asyncio.to_thread for the blocking call)"
)


@dataclass(slots=True)
class _Culprit:
    inv: Invocation | None
    attempt: Attempt | None
    where: str | None
    started: float


def _where(frame: FrameType | None) -> str | None:
    """The innermost frame outside flowkeeper and asyncio: file:line in function."""
    found = None
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_PLUMBING):
            found = frame
            break
        frame = frame.f_back
    if found is None:
        return None
    line = linecache.getline(found.f_code.co_filename, found.f_lineno).strip()
    text = f"{found.f_code.co_filename}:{found.f_lineno} in {found.f_code.co_name}"
    return f"{text}: {line}" if line else text


def _current_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
    tasks = getattr(asyncio.tasks, "_current_tasks", None)
    if isinstance(tasks, dict):
        task = tasks.get(loop)
        return task if isinstance(task, asyncio.Task) else None
    return None


class StallWatch(Observer):
    """The observer that watches the loop while async steps run."""

    def __init__(self, store: Store, threshold: float) -> None:
        self.store = store
        self.threshold = threshold
        self.interval = max(0.01, threshold / 5)
        self._lock = threading.Lock()
        self._running: dict[asyncio.Task[Any], tuple[Invocation, Attempt]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._beat = 0.0
        self._beating = False
        self._culprit: _Culprit | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._writes: set[asyncio.Task[None]] = set()

    # hooks --------------------------------------------------------------------------------
    def attempt_started(self, inv: Invocation, attempt: Attempt) -> None:
        if not attempt.is_async:
            return
        task = asyncio.current_task()
        if task is None:
            return
        loop = task.get_loop()
        with self._lock:
            self._running[task] = (inv, attempt)
            if loop is not self._loop:
                self._loop, self._loop_thread, self._beating = loop, threading.get_ident(), False
                self._culprit = None
            start = not self._beating
            self._beating = True
        if start:
            self._beat = time.monotonic()
            # In an empty context: the beat belongs to no run (nor to this step's scope).
            loop.call_later(
                self.interval,
                self._on_beat,
                loop,
                self._beat + self.interval,
                context=contextvars.Context(),
            )
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._watch, name="flowkeeper-stall-watch", daemon=True
            )
            self._thread.start()
        self._wake.set()

    def attempt_ended(self, inv: Invocation, attempt: Attempt, error: BaseException | None) -> None:
        if not attempt.is_async:
            return
        with self._lock:
            task = asyncio.current_task()
            if task is not None:
                self._running.pop(task, None)
            culprit = self._culprit
            mine = culprit is not None and culprit.attempt is attempt
            if mine:
                self._culprit = None
        if mine and culprit is not None:  # it blocked until its very end
            self._report(culprit, time.monotonic() - culprit.started)

    # the loop's beat and the watchdog -------------------------------------------------------
    def _on_beat(self, loop: asyncio.AbstractEventLoop, expected: float) -> None:
        now = time.monotonic()
        lag = now - expected
        self._beat = now
        with self._lock:
            culprit, self._culprit = self._culprit, None
            going = bool(self._running) and loop is self._loop
            if not going and loop is self._loop:
                self._beating = False
        if culprit is not None and lag > self.threshold:
            self._report(culprit, lag)
        if going:
            loop.call_later(
                self.interval,
                self._on_beat,
                loop,
                now + self.interval,
                context=contextvars.Context(),
            )

    def _watch(self) -> None:
        while True:
            if not self._beating:
                self._wake.clear()
                self._wake.wait(5.0)
                continue
            time.sleep(self.interval)
            late = time.monotonic() - self._beat - self.interval
            if late <= self.threshold or self._culprit is not None:
                continue
            loop, ident = self._loop, self._loop_thread
            if loop is None or ident is None:
                continue
            task = _current_task(loop)
            if task is None:
                # No task holds the loop (it waits in select): the process itself was
                # starved of CPU, which no step can be blamed for.
                continue
            with self._lock:
                entry = self._running.get(task)
                frame = sys._current_frames().get(ident)
                self._culprit = _Culprit(
                    entry[0] if entry else None,
                    entry[1] if entry else None,
                    _where(frame),
                    self._beat + self.interval,
                )

    # reporting (on the loop's thread) ---------------------------------------------------------
    def _report(self, culprit: _Culprit, seconds: float) -> None:
        if culprit.inv is None or culprit.attempt is None:
            logger.warning(
                "the event loop was blocked for %.2fs (over %.2fs) at %s while async steps ran",
                seconds,
                self.threshold,
                culprit.where or "an unknown place",
            )
            return
        inv, attempt = culprit.inv, culprit.attempt
        logger.warning(
            "run %s: async step %r (attempt %d) blocked the event loop for %.2fs (threshold "
            "%.2fs)%s, stalling every run this process executes; %s",
            inv.run_id,
            attempt.key,
            attempt.attempt,
            seconds,
            self.threshold,
            f" at {culprit.where}" if culprit.where else "",
            ADVICE,
        )
        detail = {
            "seconds": round(seconds, 3),
            "threshold": self.threshold,
            "where": culprit.where,
            "advice": ADVICE,
        }
        task = asyncio.get_running_loop().create_task(self._record(inv, attempt, detail))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _record(self, inv: Invocation, attempt: Attempt, detail: dict[str, Any]) -> None:
        try:
            await self.store.run_event_add(
                inv.run_id, "loop_stall", attempt.key, attempt.attempt, json.dumps(detail)
            )
        except Exception as exc:
            logger.warning("run %s: loop stall not recorded: %s", inv.run_id, exc)
