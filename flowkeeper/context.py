"""The ``ctx`` a workflow function receives: durable steps and sleeps."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, overload

from .retry import RetryPolicy

if TYPE_CHECKING:
    from .engine import Execution

T = TypeVar("T")


class Context:
    """Passed as the first argument of every workflow function.

    Everything with a side effect belongs in ``ctx.step``: the workflow
    function itself is replayed from the top on every invocation, and each
    ``ctx.step`` answers from its recorded result once it has one.
    """

    __slots__ = ("_exec",)

    def __init__(self, execution: Execution) -> None:
        self._exec = execution

    @property
    def run_id(self) -> str:
        """The id of the run being executed."""
        return self._exec.run_id

    @property
    def workflow_name(self) -> str:
        """The name of the workflow being executed."""
        return self._exec.workflow.name

    @property
    def invocation(self) -> int:
        """How many invocations this run has had, this one included (1-based)."""
        return self._exec.claimed.invocations

    @overload
    async def step(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        **kwargs: Any,
    ) -> T: ...

    @overload
    async def step(
        self,
        name: str,
        fn: Callable[..., T],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        **kwargs: Any,
    ) -> T: ...

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` once for this run and record its result.

        ``fn`` may be sync (run in a thread) or async.  Its result must be
        JSON-serialisable or a pydantic model; it is returned as the function's
        return annotation describes, on the first execution and on every replay.
        A failure is retried with ``retry`` (default: the workflow's policy, else
        5 attempts with exponential backoff from 1 s); ``timeout`` bounds each
        attempt.  Once retries are exhausted, :class:`StepFailedError` is raised
        here.  ``name`` must be unique within the run; a name repeated in a loop
        is numbered automatically (``name``, ``name#2``...).
        """
        return await self._exec.step(name, fn, args, kwargs, retry=retry, timeout=timeout)

    async def sleep(self, name: str, duration: timedelta | float) -> None:
        """Pause the run durably for ``duration`` (a timedelta, or seconds).

        The wake time is recorded and the invocation ends; the run resumes on
        the first invocation after it.  On replay, a sleep that is over returns
        at once.
        """
        await self._exec.sleep(name, duration=duration, until=None)

    async def sleep_until(self, name: str, when: datetime) -> None:
        """Pause the run durably until ``when`` (a timezone-aware datetime)."""
        await self._exec.sleep(name, duration=None, until=when)
