"""The ``ctx`` a workflow function receives: durable steps and sleeps."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from .retry import RetryPolicy

if TYPE_CHECKING:
    from .children import ChildHandle
    from .engine import Execution
    from .stepctx import StepContext
    from .tokens import Token
    from .workflow import Workflow

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

    @property
    def idempotency_key(self) -> str:
        """Inside a step's function: a stable key for this (run, step), e.g. for Stripe.

        The same on every attempt, after a crash and on every replay, and
        different for each loop occurrence of a step name (``charge``,
        ``charge#2``...) and for each run: pass it as the provider's
        ``Idempotency-Key`` (or dedup id) so a charge whose answer was lost is
        not made twice.  Raises :class:`StepUsageError` outside a step.
        """
        return self.step_context.idempotency_key

    @property
    def step_context(self) -> StepContext:
        """Inside a step's function: the running step (run id, step key, attempt)."""
        from .stepctx import current_step

        step = current_step()
        if step.run_id != self.run_id:  # pragma: no cover - a ctx captured by another run
            from .errors import StepUsageError

            raise StepUsageError(
                f"This ctx belongs to run {self.run_id}, but the step running here belongs "
                f"to run {step.run_id}: use that run's own ctx."
            )
        return step

    @overload
    async def step(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        rate_limit: str | None = None,
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
        rate_limit: str | None = None,
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
        rate_limit: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` once for this run and record its result.

        ``fn`` may be sync (run in one of flowkeeper's step threads) or async.  Its result must be
        JSON-serialisable or a pydantic model; it is returned as the function's
        return annotation describes, on the first execution and on every replay.
        A failure is retried with ``retry`` (default: the workflow's policy, else
        5 attempts with exponential backoff from 1 s); ``timeout`` bounds each
        attempt.  Once retries are exhausted, :class:`StepFailedError` is raised
        here.  ``name`` must be unique within the run; a name repeated in a loop
        is numbered automatically (``name``, ``name#2``...).  ``rate_limit``
        names a limit declared with ``FlowKeeper(rate_limits=...)``: each
        attempt starts no sooner than the limit allows, waiting (or the run
        sleeping) until then (see :mod:`flowkeeper.steprates`).
        """
        return await self._exec.step(
            name, fn, args, kwargs, retry=retry, timeout=timeout, rate_limit=rate_limit
        )

    async def parallel(
        self,
        *branches: Awaitable[Any] | Callable[[], Awaitable[Any]],
        max_concurrency: int | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Run branches concurrently; return their results in order.

        Each branch is an awaitable (``ctx.step("a", fa)``) or a function
        returning one (``lambda: ship(ctx, order)``, a branch of several ctx
        calls).  At most ``max_concurrency`` run at a time.  When one fails, no
        further branch starts, the running ones finish (their results are
        recorded), and the lowest-numbered failure is raised; with
        ``return_exceptions=True`` failures are returned in their place.
        Names must not repeat across branches (use ``f"name:{i}"``).
        """
        from .parallel import run_branches

        return await run_branches(
            self._exec,
            list(branches),
            max_concurrency=max_concurrency,
            return_exceptions=return_exceptions,
            what="ctx.parallel(...)",
        )

    @overload
    async def map(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        items: Iterable[Any],
        /,
        *,
        max_concurrency: int | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        rate_limit: str | None = None,
        return_exceptions: bool = False,
    ) -> list[T]: ...

    @overload
    async def map(
        self,
        name: str,
        fn: Callable[..., T],
        items: Iterable[Any],
        /,
        *,
        max_concurrency: int | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        rate_limit: str | None = None,
        return_exceptions: bool = False,
    ) -> list[T]: ...

    async def map(
        self,
        name: str,
        fn: Callable[..., Any],
        items: Iterable[Any],
        /,
        *,
        max_concurrency: int | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        rate_limit: str | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Run ``fn(item)`` as a memoized step for each item, concurrently.

        Step ``i`` is keyed ``name[i]``; results come back in the items' order.
        ``max_concurrency`` bounds this map (the process-wide bound is
        ``FlowKeeper(max_parallel_steps=...)``); ``retry``, ``timeout`` and
        ``rate_limit`` apply to each item's step.  Failures behave as in :meth:`parallel`.
        """
        from .parallel import map_steps

        return await map_steps(
            self._exec,
            name,
            fn,
            items,
            max_concurrency=max_concurrency,
            retry=retry,
            timeout=timeout,
            rate_limit=rate_limit,
            return_exceptions=return_exceptions,
        )

    # child runs -----------------------------------------------------------------------------
    async def start_child(
        self,
        name: str,
        workflow: str | Workflow | Callable[..., Any],
        input: Any = None,
        *,
        cancel_with_parent: bool = True,
        max_concurrency: int | None = None,
    ) -> ChildHandle:
        """Start a child run of ``workflow`` (once, however often this run replays).

        The child is a run of its own, dispatched at once as its own invocation.
        It records this run as its parent and ``name`` as the step that
        started it.  At most ``max_concurrency`` children of this run are live
        at once (default ``FlowKeeper(max_children=100)``); the rest start as
        earlier ones finish.  Cancelling this run cancels the child unless
        ``cancel_with_parent=False``.  The workflow must be registered in this
        process (else :class:`UnknownWorkflowError` here, nothing started), and
        ``input`` is checked against its annotation.
        """
        return await self._exec.start_child(
            name,
            workflow,
            input,
            cancel_with_parent=cancel_with_parent,
            max_concurrency=max_concurrency,
        )

    async def wait_for_children(
        self,
        handles: Iterable[ChildHandle],
        *,
        name: str = "children",
        timeout: timedelta | float | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Suspend this run until every child in ``handles`` has finished; their outputs.

        No invocation is held meanwhile: the last child to finish makes this
        run due.  A failed or cancelled child raises :class:`ChildFailedError`
        (the first in ``handles`` order); past ``timeout``,
        :class:`ChildTimeoutError` (the children go on running).  With
        ``return_exceptions=True`` those errors are returned in their place.
        """
        return await self._exec.wait_for_children(
            list(handles), name=name, timeout=timeout, return_exceptions=return_exceptions
        )

    async def invoke(
        self,
        name: str,
        workflow: str | Workflow | Callable[..., Any],
        input: Any = None,
        *,
        timeout: timedelta | float | None = None,
        cancel_with_parent: bool = True,
    ) -> Any:
        """Run ``workflow`` as a child run and return its output (see :meth:`start_child`).

        The parent is suspended durably while the child works, and resumes
        with the child's output (typed by the child's return annotation), or
        raises :class:`ChildFailedError` / :class:`ChildTimeoutError`.  To run
        several at once, gather invokes (each branch resumes when its child
        is done), or start them with :meth:`start_child` and await
        :meth:`wait_for_children` (one wait for all: cheapest for many).
        """
        handle = await self.start_child(
            name, workflow, input, cancel_with_parent=cancel_with_parent
        )
        (result,) = await self.wait_for_children([handle], name=f"{name}:wait", timeout=timeout)
        return result

    async def transaction(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        isolation: Literal["read_committed", "repeatable_read", "serializable"] = (
            "read_committed"
        ),
        pool: Any = None,
        **kwargs: Any,
    ) -> T:
        """Run ``await fn(conn, *args, **kwargs)`` exactly once, in a database transaction.

        ``conn`` is an asyncpg connection inside a transaction on flowkeeper's
        database; the step's result is recorded in that same transaction, so
        your writes and the record commit together or not at all: whatever
        happens to the process, the step's effect on your tables happens once.
        Do not commit, roll back or swallow database errors in ``fn``
        (:class:`TransactionUsageError`).  A failure rolls back and is retried
        with ``retry`` like a step (serialization failures and deadlocks too).
        ``pool``: an ``asyncpg.Pool`` of your own, which must reach the same
        database (else :class:`TransactionDatabaseError`); by default
        flowkeeper's own connections are used (fine behind PgBouncer).
        """
        value: T = await self._exec.transaction(
            name, fn, args, kwargs, retry=retry, timeout=timeout, isolation=isolation, pool=pool
        )
        return value

    def patched(self, patch_id: str) -> bool:
        """Whether this run takes the new branch of code change ``patch_id``.

        True for runs that reach this point on the new code (new runs, and old
        ones whose recorded history ends before it); False for runs whose
        history was recorded past this point by the old code, which must
        replay the old branch.  Recorded once per run (history kind
        ``patch``); every replay answers the same.  See :mod:`flowkeeper.patches`.
        """
        return self._exec.patched(patch_id)

    def deprecate_patch(self, patch_id: str) -> None:
        """Retire ``patch_id`` once no live run is on its old branch (the ``if`` is gone).

        A run that had taken the old branch fails with a :class:`DeterminismError`
        saying so instead of replaying the new code over an old history.
        """
        self._exec.deprecate_patch(patch_id)

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

    # events and waits -----------------------------------------------------------------------
    async def wait_for_event(
        self,
        name: str,
        *,
        event: str,
        match: dict[str, Any] | None = None,
        timeout: timedelta | float | None = None,
        lookback: timedelta | float | None = None,
        model: Any = None,
    ) -> Any:
        """Suspend the run durably until an event ``event`` matching ``match`` arrives.

        Returns the event's data (validated as ``model`` when given: a pydantic
        model or any type pydantic knows), or ``None`` after ``timeout``.  No
        invocation is held while the run waits.  ``match`` compares fields of
        the event's data for equality: ``{"order_id": order.id}``, nested as
        ``{"customer": {"tier": "gold"}}`` or ``{"customer.tier": "gold"}``;
        values are strings, numbers or booleans.  An event sent *before* the
        wait began also satisfies it when it was sent within ``lookback`` (by
        default: since the run was triggered) and has not satisfied an earlier
        wait of this run — an event that comes first is never lost.  ``name``
        keys the wait in the run's history, like a step's name.
        """
        from .waits import event_spec

        spec = event_spec(event, match, timeout, lookback, model)
        return await self._exec.wait(name, spec)

    async def send_event(self, event: str, data: Any = None, *, id: str | None = None) -> Any:
        """Send an event from the workflow, once however often the run replays.

        A memoized step (keyed ``send:<event>``): the event's id defaults to the
        run and that step's key, so a crash between sending and recording it
        never sends it twice.  Returns what it did (``event_id``, ``woken``...).
        """
        return await self._exec.send_event(event, data, id)

    async def create_token(self, name: str, *, timeout: timedelta | float | None = None) -> Token:
        """Make an approval token (a memoized step): its ``url`` completes it when POSTed.

        Give the URL (or ``token.id``, for :meth:`FlowKeeper.complete_token`)
        to whoever must approve, then ``await ctx.wait_for_token(token)``.  The
        URL carries an unguessable id signed with the app's signing key.
        """
        delta = None
        if timeout is not None:
            seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
            if isinstance(seconds, bool) or not 0 < float(seconds) < 100 * 365 * 86400:
                from .errors import StepUsageError

                raise StepUsageError(f"create_token timeout must be positive, got {timeout!r}")
            delta = timedelta(seconds=float(seconds))
        return await self._exec.create_token(name, delta)

    async def wait_for_token(
        self,
        token: Token,
        *,
        name: str | None = None,
        timeout: timedelta | float | None = None,
        model: Any = None,
    ) -> Any:
        """Suspend the run until ``token`` is completed; return the JSON it was completed
        with (as ``model`` when given), or ``None`` once it expired or ``timeout`` passed."""
        from .errors import StepUsageError
        from .tokens import Token as TokenModel
        from .waits import token_spec

        if not isinstance(token, TokenModel):
            raise StepUsageError(
                f"wait_for_token takes the Token that ctx.create_token returned, got {token!r}"
            )
        signer = self._exec.engine.tokens
        raw = signer.raw_id(token.id) if signer is not None else None
        if raw is None:
            raise StepUsageError(f"Token {token.name!r} was not made by this app's signing key.")
        return await self._exec.wait(
            name or f"approval:{token.name}", token_spec(token, timeout, model, raw)
        )

    # the run's stream -------------------------------------------------------------------------
    async def publish(self, topic: str, data: Any = None) -> None:
        """Append a message to the run's stream (progress, partial results).

        Readers (``fk.stream``, the SSE route, the dashboard) see it within
        milliseconds.  Inside a step the message carries the step's key and
        attempt; from the workflow function itself it is sent when the run
        reaches it for the first time, not on replays.  ``data`` must be JSON
        (64 KiB at most); a run keeps at most 10,000 messages.
        """
        self._exec.publish(topic, data)

    def publish_nowait(self, topic: str, data: Any = None) -> None:
        """:meth:`publish` for sync steps (any thread): queues the message and returns."""
        self._exec.publish(topic, data)
