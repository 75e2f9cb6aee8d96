"""Run workflows to completion inside a test: no HTTP, no scheduler, a fake clock.

:class:`WorkflowRunner` drives runs through :meth:`FlowKeeper.advance` (what
the endpoint does for each invocation) on a FlowKeeper of its own whose
database is the test's; when a run sleeps, waits with a timeout or retries
later, the runner moves the database clock (:class:`FakeClock`) to its due
time and goes on, so a one-day sleep takes milliseconds.  A run waiting for
an event with no timeout is returned as it is (``status == "waiting"``):
:meth:`WorkflowRunner.send_event` feeds it and drives it on.

``mock_step("charge-card", returns=...)`` replaces the function of every
step of that name in runs this runner drives; the original function's return
annotation still shapes the recorded result.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..context import Context
from ..errors import FlowKeeperError
from ..models import RunInfo, RunStatus

if TYPE_CHECKING:
    from ..client import FlowKeeper
    from .clock import FakeClock


class RunnerError(FlowKeeperError):
    """The runner could not drive a run to an end (it keeps being handed on, or is leased)."""


_NOTHING: Any = object()


@dataclass
class StepMock:
    """What ``runner.mock_step`` installed: a canned result or error, and the calls made."""

    name: str
    returns: Any = None
    raises: BaseException | type[BaseException] | None = None
    side_effect: Callable[..., Any] | None = None
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)

    @property
    def call_count(self) -> int:
        return len(self.calls)

    def replace(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """A function with ``original``'s signature and annotations that answers as mocked."""

        @functools.wraps(original)
        async def mocked(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((args, kwargs))
            if self.raises is not None:
                raise self.raises
            if self.side_effect is not None:
                result = self.side_effect(*args, **kwargs)
                return await result if inspect.isawaitable(result) else result
            return self.returns

        return mocked


# The mocks of the runner driving the current task (None outside a runner).
_mocks: contextvars.ContextVar[dict[str, StepMock] | None] = contextvars.ContextVar(
    "flowkeeper_step_mocks", default=None
)
_original_step = Context.step


async def _step_with_mocks(
    self: Context, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
) -> Any:
    mocks = _mocks.get()
    if mocks is not None and name in mocks:
        fn = mocks[name].replace(fn)
    return await _original_step(self, name, fn, *args, **kwargs)


_installed = False


def _install_step_hook() -> None:
    """Route ``ctx.step`` through the mock table (a no-op outside a runner's task)."""
    global _installed
    if not _installed:
        functools.update_wrapper(_step_with_mocks, _original_step)
        Context.step = _step_with_mocks  # type: ignore[method-assign]
        _installed = True


class WorkflowRunner:
    """Drive runs of ``fk``'s workflows to their end on a fake clock (see the module doc).

    ``fk`` must have no endpoint (runs are executed here, never pushed) and
    ``clock`` must be installed in its schema.  ``auto_skip=False`` leaves
    sleeping and retrying runs as they are, for tests that move time with
    :meth:`advance` themselves.
    """

    #: Invocations one ``run()`` may take before it gives up (a run handed on forever).
    MAX_INVOCATIONS = 10_000

    def __init__(self, fk: FlowKeeper, clock: FakeClock, *, auto_skip: bool = True) -> None:
        if fk.dispatcher is not None:
            raise RunnerError("WorkflowRunner needs a FlowKeeper without an endpoint")
        _install_step_hook()
        self.fk = fk
        self.clock = clock
        self.auto_skip = auto_skip
        self.mocks: dict[str, StepMock] = {}
        self.run_ids: list[str] = []

    # mocking --------------------------------------------------------------------------
    def mock_step(
        self,
        name: str,
        *,
        returns: Any = _NOTHING,
        raises: BaseException | type[BaseException] | None = None,
        side_effect: Callable[..., Any] | None = None,
    ) -> StepMock:
        """Replace the function of every step called ``name`` (``returns=``, ``raises=``
        on each attempt, or ``side_effect=`` a function called with the step's arguments)."""
        given = sum(x is not None for x in (raises, side_effect)) + (returns is not _NOTHING)
        if given != 1:
            raise ValueError("mock_step takes exactly one of returns=, raises=, side_effect=")
        mock = StepMock(
            name,
            returns=None if returns is _NOTHING else returns,
            raises=raises,
            side_effect=side_effect,
        )
        self.mocks[name] = mock
        return mock

    # driving ---------------------------------------------------------------------------
    async def run(
        self, workflow: Any, input: Any = None, *, idempotency_key: str | None = None
    ) -> RunInfo:
        """Trigger ``workflow`` with ``input`` and drive it until it finishes or waits."""
        handle = await self.fk.trigger(workflow, input, idempotency_key=idempotency_key)
        if handle.run_id not in self.run_ids:
            self.run_ids.append(handle.run_id)
        return await self.drive(handle.run_id)

    async def drive(self, run_id: str) -> RunInfo:
        """Execute ``run_id`` until it finishes, or waits for something only a test can give."""
        token = _mocks.set(self.mocks)
        try:
            for _ in range(self.MAX_INVOCATIONS):
                info = await self.fk.get_run(run_id)
                if info.is_finished:
                    return info
                if not await self._due(info):
                    # A wait is the test's to resolve (send_event, or advance past its timeout).
                    if not self.auto_skip or info.due_at is None or info.status == "waiting":
                        return info
                    await self._skip_to(info)
                await self.fk.advance(run_id)
            raise RunnerError(
                f"run {run_id} did not finish within {self.MAX_INVOCATIONS} invocations"
            )
        finally:
            _mocks.reset(token)

    async def advance(self, by: timedelta | float) -> list[RunInfo]:
        """Move the clock by ``by`` and drive every run of this runner that is now due."""
        await self.clock.advance(by)
        return await self._drive_due()

    async def send_event(self, event: str, data: Any = None, **kwargs: Any) -> Any:
        """Send an event (``fk.send_event``), then drive the runs it woke or started."""
        result = await self.fk.send_event(event, data, **kwargs)
        for run_id in [*result.woken, *result.started]:
            if run_id not in self.run_ids:
                self.run_ids.append(run_id)
        await self._drive_due()
        return result

    async def complete_token(self, token: Any, data: Any = None) -> Any:
        """Complete an approval token (``fk.complete_token``) and drive the run it wakes."""
        result = await self.fk.complete_token(str(getattr(token, "id", token)), data)
        await self._drive_due()
        return result

    async def get_run(self, run_id: str) -> RunInfo:
        return await self.fk.get_run(run_id)

    # internals -------------------------------------------------------------------------
    async def _due(self, info: RunInfo) -> bool:
        if info.status == RunStatus.QUEUED and info.due_at is None:
            return True
        if info.due_at is None:
            return False
        return info.due_at <= await self.fk.store.clock_now()

    async def _skip_to(self, info: RunInfo) -> None:
        assert info.due_at is not None
        now = await self.fk.store.clock_now()
        if info.due_at > now:
            await self.clock.advance(info.due_at - now)

    async def _drive_due(self) -> list[RunInfo]:
        out = []
        for run_id in list(self.run_ids):
            info = await self.fk.get_run(run_id)
            if not info.is_finished and await self._due(info):
                info = await self.drive(run_id)
            out.append(info)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.run_ids)
