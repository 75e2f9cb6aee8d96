"""The threads sync step functions run in: flowkeeper's own, bounded, hang-tolerant.

asyncio's default executor is shared with the whole application and small
(``min(32, cpus + 4)`` threads); a handful of sync steps that hang past their
timeout would fill it, and every later sync step in the process would then
time out waiting for a thread.  Here:

- at most ``max_workers`` threads run steps at once; more steps wait their turn;
- a thread whose step overran its timeout is *abandoned*: it gives up its
  place, so another thread may start, and ends when its function returns
  (Python cannot stop a thread).  Abandoned threads are counted and logged;
  past ``max_abandoned`` of them new sync steps wait for one to end, so a
  process whose steps all hang cannot grow threads without bound;
- threads are daemons: a hung step never keeps the process from exiting.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("flowkeeper")

_names = itertools.count(1)


class StepExecutor:
    """Runs sync step functions in threads of its own (see the module docstring)."""

    def __init__(self, max_workers: int = 32, *, max_abandoned: int | None = None) -> None:
        if max_workers < 1:
            raise ValueError("StepExecutor needs at least one worker thread")
        self.max_workers = max_workers
        # Each abandoned thread belongs to an invocation that waits for it, so
        # their number follows the invocations in flight; the cap is a backstop.
        self.max_abandoned = 4 * max_workers if max_abandoned is None else max_abandoned
        self._lock = threading.Lock()
        self._queue: deque[tuple[concurrent.futures.Future[Any], Callable[[], Any]]] = deque()
        self._idle = 0  # threads waiting for work
        self._running = 0  # threads holding a place (not abandoned)
        self._abandoned: set[concurrent.futures.Future[Any]] = set()
        self._wakeup = threading.Condition(self._lock)

    @property
    def abandoned(self) -> int:
        """Threads still running a step that overran its timeout."""
        with self._lock:
            return len(self._abandoned)

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn()`` in a step thread; its future has the result."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            self._queue.append((future, fn))
            self._dispatch()
        return future

    def _dispatch(self) -> None:
        """Wake or start a thread for queued work (holding the lock)."""
        if len(self._queue) <= self._idle:
            self._wakeup.notify()
        elif self._running < self.max_workers and len(self._abandoned) <= self.max_abandoned:
            self._running += 1
            threading.Thread(
                target=self._work, name=f"flowkeeper-step-{next(_names)}", daemon=True
            ).start()

    def abandon(self, future: concurrent.futures.Future[Any]) -> bool:
        """The running step in ``future`` overran its timeout: its thread gives up its place.

        Returns False when there is nothing to abandon (it ended, or never started).
        """
        with self._lock:
            if not future.running() or future in self._abandoned:
                return False
            self._abandoned.add(future)
            self._running -= 1
            count = len(self._abandoned)
            if self._queue:
                self._dispatch()
        logger.warning(
            "a sync step overran its timeout and its thread is still running (%d such "
            "thread(s) in this process); Python cannot stop it, so its retry waits until it "
            "returns",
            count,
        )
        return True

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._idle += 1
                    woken = self._wakeup.wait(timeout=60)
                    self._idle -= 1
                    if not woken and not self._queue:  # idle for a minute: let it go
                        self._running -= 1
                        return
                future, fn = self._queue.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    result = fn()
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            with self._lock:
                if future in self._abandoned:
                    # It gave up its place at the timeout: end, unless a place is free again.
                    self._abandoned.discard(future)
                    if self._running >= self.max_workers:
                        return
                    self._running += 1
