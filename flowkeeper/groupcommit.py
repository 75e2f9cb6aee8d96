"""Group commit: concurrent writes of one process share one Postgres transaction.

Under load, many runs in one process finish a step at the same moment, and
each would pay a commit (a WAL flush) of its own.  :class:`GroupCommit` lets
at most ``max_inflight`` writes go to Postgres at once (the pool's size: more
would wait for a connection anyway), each alone exactly as without it, so a
process that is not saturated adds no latency; writes that arrive while all
of those are busy queue up and go, when one finishes, together in one
transaction: one commit for the lot.

Nothing about a write changes: each keeps its own fencing (its ``WHERE
lease_token = ...``) and is answered with its own row.  (The store sends a
batch's consecutive step writes of different runs as one statement, each
run fenced on its own: ``Store._call_many``, ``commit_lean_many``.)  A
batch in which Postgres refuses one statement is rolled back whole (nothing
of it was committed) and its writes are sent again one by one, so the refusal
reaches only the write that caused it.  When the connection fails mid-batch,
every write of the batch gets the error, as a lone write would: its outcome
is unknown, and the lease brings the run back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
#: One write: the name of its statement and its arguments.
Args = tuple[str, tuple[Any, ...]]

#: One write, alone (as without group commit).
RunOne = Callable[[Args], Awaitable[T]]
#: Several writes, in order, in one transaction; raises BatchRefused if
#: Postgres refused one of them (and then nothing was committed).
RunMany = Callable[[Sequence[Args]], Awaitable[list[T]]]


class BatchRefused(Exception):
    """Raised by a RunMany when Postgres refused one statement of the batch."""


class GroupCommit(Generic[T]):
    """Combines concurrent writes into shared transactions."""

    def __init__(self, run_one: RunOne[T], run_many: RunMany[T], *, max_inflight: int) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self._run_one = run_one
        self._run_many = run_many
        self._max_inflight = max_inflight
        self._inflight = 0
        self._queue: list[tuple[Args, asyncio.Future[T]]] = []
        #: Writes and transactions sent, for benchmarks and tests.
        self.writes = 0
        self.batches = 0

    async def submit(self, name: str, args: tuple[Any, ...]) -> T:
        """Send one write of statement ``name``; returns what it returned."""
        write = (name, args)
        if self._inflight < self._max_inflight and not self._queue:
            self._inflight += 1
            try:
                self.writes += 1
                return await self._run_one(write)
            finally:
                self._inflight -= 1
                self._start_batch()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._queue.append((write, future))
        # A write whose caller was cancelled still goes (it may have been the
        # last word of its invocation); its answer is simply not read.
        return await asyncio.shield(future)

    def _start_batch(self) -> None:
        if not self._queue or self._inflight >= self._max_inflight:
            return
        batch, self._queue = self._queue, []
        self._inflight += 1
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        task.add_done_callback(_retrieve)

    async def _flush(self, batch: list[tuple[Args, asyncio.Future[T]]]) -> None:
        try:
            self.writes += len(batch)
            if len(batch) == 1:
                await self._settle_one(*batch[0])
                return
            self.batches += 1
            try:
                rows = await self._run_many([args for args, _ in batch])
            except BatchRefused:
                # Rolled back whole: send each again alone, so the refusal
                # reaches only the write that caused it.
                for args, future in batch:
                    await self._settle_one(args, future)
                return
            except BaseException as exc:
                for _, future in batch:
                    _fail(future, exc)
                if not isinstance(exc, Exception):
                    raise
                return
            for (_, future), row in zip(batch, rows, strict=True):
                if not future.done():
                    future.set_result(row)
        finally:
            self._inflight -= 1
            self._start_batch()

    async def _settle_one(self, args: Args, future: asyncio.Future[T]) -> None:
        try:
            row = await self._run_one(args)
        except BaseException as exc:
            _fail(future, exc)
            if not isinstance(exc, Exception):
                raise
            return
        if not future.done():
            future.set_result(row)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if future.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(exc)


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Read the outcome so that one whose caller stopped waiting is not reported
    # as "never retrieved"; the caller that still waits gets it as usual.
    if not future.cancelled():
        future.exception()
