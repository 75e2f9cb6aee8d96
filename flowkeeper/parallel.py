"""Concurrent branches of a workflow: ``ctx.parallel`` and ``ctx.map``.

``asyncio.gather`` of ctx calls works as it is (the engine keys the history
of concurrent branches by name, writes each branch's result as soon as it
arrives, and bounds how many step bodies execute at once); these helpers add
a per-call bound and a documented failure rule:

- the branches run at most ``max_concurrency`` at a time (in order: a branch
  starts when a slot frees up);
- when one fails, no further branch starts; the ones already running finish
  (their results are recorded, so nothing done is lost), then the failure of
  the lowest-numbered failed branch is raised, as for a single step;
- ``return_exceptions=True`` returns each failure in its branch's place.

``asyncio.gather`` keeps asyncio's own rule: the first failure is raised at
once and the other branches go on running; those still running when the
workflow function ends are cancelled (their attempts are not recorded).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .errors import StepUsageError
from .retry import RetryPolicy

if TYPE_CHECKING:
    from .engine import Execution

Branch = Awaitable[Any] | Callable[[], Awaitable[Any]]


def _limit(value: int | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StepUsageError(f"{what}: max_concurrency must be a positive int, got {value!r}")
    return value


async def run_branches(
    execution: Execution,
    branches: list[Branch],
    *,
    max_concurrency: int | None,
    return_exceptions: bool,
    what: str,
) -> list[Any]:
    """Run ``branches`` as concurrent branches of the workflow (see the module docstring)."""
    limit = _limit(max_concurrency, what)
    for branch in branches:
        if not (inspect.isawaitable(branch) or callable(branch)):
            _close(branches)
            raise StepUsageError(
                f"{what} takes awaitables (e.g. ctx.step(...)) or functions returning one, "
                f"got {branch!r}"
            )
    if not branches:
        return []
    gate = asyncio.Semaphore(limit) if limit is not None else None
    failed = False
    skipped = object()

    async def one(branch: Branch) -> Any:
        nonlocal failed
        if gate is not None:
            await gate.acquire()
        try:
            if failed:
                _close([branch])
                return skipped
            awaitable = branch() if callable(branch) else branch
            try:
                return await awaitable
            except Exception:
                if not return_exceptions:
                    failed = True
                raise
        finally:
            if gate is not None:
                gate.release()

    tasks = [execution.spawn(one(branch)) for branch in branches]
    try:
        await asyncio.wait(tasks)
    finally:
        for task in tasks:  # the workflow itself was cancelled or suspended
            task.cancel()
    results: list[Any] = []
    first_error: BaseException | None = None
    for task in tasks:
        if task.cancelled():
            raise asyncio.CancelledError
        exc = task.exception()
        if exc is not None and not isinstance(exc, Exception):
            raise exc  # the run's suspension, a lost database: not the branch's failure
        if exc is not None and first_error is None:
            first_error = exc
        results.append(exc if exc is not None else task.result())
    if first_error is not None and not return_exceptions:
        raise first_error
    return results


def _close(branches: Iterable[Branch]) -> None:
    """Branches never started: close their coroutines (no 'never awaited' warning)."""
    for branch in branches:
        close = getattr(branch, "close", None)
        if inspect.iscoroutine(branch) and close is not None:
            close()


async def map_steps(
    execution: Execution,
    name: str,
    fn: Callable[..., Any],
    items: Iterable[Any],
    *,
    max_concurrency: int | None,
    retry: RetryPolicy | None,
    timeout: float | timedelta | None,
    rate_limit: str | None,
    return_exceptions: bool,
) -> list[Any]:
    """ctx.map: one memoized step per item, keyed ``name[index]``.

    A second map of the same name in one run numbers its keys like any
    repeated name: ``name[0]#2``...
    """
    what = f"ctx.map({name!r}, ...)"
    if not callable(fn):
        raise StepUsageError(f"{what} needs a function, got {fn!r}")
    _limit(max_concurrency, what)
    values = list(items)

    def branch(index: int, item: Any) -> Callable[[], Awaitable[Any]]:
        def start() -> Awaitable[Any]:
            return execution.step(
                f"{name}[{index}]", fn, (item,), {}, retry=retry, timeout=timeout,
                rate_limit=rate_limit,
            )  # fmt: skip

        return start

    return await run_branches(
        execution,
        [branch(i, item) for i, item in enumerate(values)],
        max_concurrency=max_concurrency,
        return_exceptions=return_exceptions,
        what=what,
    )
