"""The engine: advances one claimed run by replaying its workflow function.

The engine knows nothing of HTTP.  Given a run id (and the lease token its
dispatcher holds) it claims the run, replays the workflow from the top,
answering each ``ctx.step`` from the recorded history, and executes new steps
one after another while the time budget lasts.  Each step's result is written
before anything that follows it runs: the write of step *n* is deferred until
step *n+1* is about to start, or folded into the run's final write — so a
three-step run costs three writes after its claim, not four.

Every write carries the lease token; a write under a token that is no longer
current is refused and the invocation stops (fencing).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import enum
import functools
import inspect
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from . import deploys, flowcontrol, observe, patches, serialization, stepctx, steprates
from .codec import DecryptionError
from .context import Context
from .errors import (
    AttemptLostError,
    DatabaseError,
    DatabaseRefusedError,
    DeterminismError,
    InvalidInputError,
    SerializationError,
    StepFailedError,
    StepTimeoutError,
    StepUsageError,
    UnknownWorkflowError,
    WorkflowError,
)
from .events import EventBus, check_event_name
from .executor import StepExecutor
from .retry import DEFAULT_RETRY, RetryPolicy
from .serialization import clean_text
from .stepinputs import InputRecorder
from .steprates import StepRates
from .store import ClaimedRun, EventRecord, HistoryEntry, StepRecord, Store
from .streams import Publisher, check_topic
from .tokens import Token, TokenSigner
from .waits import WaitSpec

if TYPE_CHECKING:
    from .children import ChildHandle
from .workflow import Registry, Workflow, validate_name

logger = logging.getLogger("flowkeeper")
_T = TypeVar("_T")

_MAX_TRACEBACK = 16_000
# Tasks renewing the leases of runs whose invocation ended during a sync step.
_HOLDERS: set[asyncio.Task[None]] = set()


class Outcome(enum.StrEnum):
    """How an invocation's segment of a run ended."""

    COMPLETED = "completed"
    FAILED = "failed"
    SLEEPING = "sleeping"
    RETRYING = "retrying"
    HANDOFF = "handoff"  # time budget used up; handed on with a fresh token
    DEFERRED = "deferred"  # workflow unknown here: given back, due later (flowkeeper.deploys)
    LEASE_LOST = "lease_lost"  # another invocation took over; nothing more written
    CANCELLED = "cancelled"  # cancelled under this invocation, which stopped its step
    WAITING = "waiting"  # suspended until an event or a token resolves a wait (or it times out)


@dataclass(frozen=True, slots=True)
class SegmentResult:
    run_id: str
    outcome: Outcome
    steps_executed: int
    due_at: datetime | None = None
    handoff_token: uuid.UUID | None = None
    error: dict[str, Any] | None = None
    deferral: deploys.Deferral | None = None

    @property
    def status(self) -> str:
        """The run's status after this segment."""
        if self.deferral is not None:
            return self.deferral.status
        if self.outcome is Outcome.HANDOFF:
            return "running"
        if self.outcome is Outcome.LEASE_LOST:
            return "unknown"
        return self.outcome.value


@dataclass(frozen=True, slots=True)
class ClaimRefused:
    """Why an invocation could not take a run."""

    run_id: str
    reason: str  # "not_found" | "finished" | "leased" | "not_due" | "blocked"
    status: str | None
    #: A run throttled by its rate limit: seconds until it may start (or look
    #: again), and whether its time was exchanged after a late wake.
    starts_in: float | None = None
    late: bool = False


@dataclass(slots=True)
class _Region:
    """The concurrent branches alive now (see Execution, "branches")."""

    start: int  # the first position the region's calls take
    lost: int  # attempts lost with an earlier invocation, charged to each new step
    next_free: int = 0
    owners: dict[str, asyncio.Task[Any] | None] = field(default_factory=dict)


@dataclass(slots=True)
class _Park:
    """A branch waiting: for a retry's backoff, a sleep, or the run's hand-off."""

    kind: str  # "retry" | "sleep" | "handoff" | "children"
    due: datetime | None
    woken: asyncio.Future[None]
    key: str = ""


class _Resolved(Exception):
    """Waits for children resolved before the run could suspend: their branches go on."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(", ".join(keys))
        self.keys = set(keys)


@dataclass(frozen=True, slots=True)
class _Retry:
    """A branch's step attempt failed and is retried at ``due``."""

    due: datetime


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# The step whose body runs in this context: (execution, key, attempt).  Sync
# bodies run in a copy of the context, so a ctx call or a publish from the
# step's thread sees it too.
_STEP: contextvars.ContextVar[tuple[Execution, str, int] | None] = contextvars.ContextVar(
    "flowkeeper_step", default=None
)


def _step_now(execution: Execution) -> tuple[str, int] | None:
    step = _STEP.get()
    if step is None or step[0] is not execution:
        return None
    return step[1], step[2]


class _Suspend(BaseException):
    """Unwinds the workflow function once its segment is over.

    A BaseException, like CancelledError, so that ``except Exception`` in
    workflow code does not swallow it.
    """

    def __init__(self, result: SegmentResult) -> None:
        super().__init__(result.outcome.value)
        self.result = result


class _Abort(BaseException):
    """Carries a DatabaseError out of the workflow function, past user code.

    A lost database must never be mistaken for the run's own failure: the
    invocation stops, writes nothing more, and the lease expiry brings the run
    back once Postgres is reachable.
    """

    def __init__(self, error: DatabaseError) -> None:
        super().__init__(str(error))
        self.error = error


_PLUMBING = (
    str(Path(__file__).resolve().parent),  # flowkeeper itself
    str(Path(asyncio.__file__).resolve().parent),
    str(Path(concurrent.futures.__file__).resolve().parent),
)


def _user_frames(tb: TracebackType | None) -> TracebackType | None:
    """Drop the leading frames of flowkeeper and asyncio: the story starts in user code."""
    first = tb
    while first is not None and first.tb_frame.f_code.co_filename.startswith(_PLUMBING):
        first = first.tb_next
    return first if first is not None else tb


def error_info(exc: BaseException, *, step: str | None = None) -> dict[str, Any]:
    """The stored form of an error: type, message, traceback (and step).

    Whatever the exception holds (NUL, lone surrogates, a ``__str__`` that
    raises), the result can be stored: an error must never be the reason a
    step's failure is not recorded.
    """
    cls = type(exc)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    try:
        message = str(exc)
    except Exception as broken:  # a user's __str__ that raises
        message = f"<{name}: str() raised {type(broken).__name__}>"
    try:
        tb = "".join(
            traceback.format_exception(exc.with_traceback(_user_frames(exc.__traceback__)))
        )
    except Exception:
        tb = f"{name}: {message}\n"
    if len(tb) > _MAX_TRACEBACK:
        tb = tb[:1000] + "\n...\n" + tb[-(_MAX_TRACEBACK - 1000) :]
    info: dict[str, Any] = {
        "type": clean_text(name),
        "message": clean_text(message),
        "traceback": clean_text(tb),
    }
    if step is not None:
        info["step"] = step
    return info


def _refusal(run_id: str, state: Any) -> ClaimRefused:
    """Why a claim of the run is refused, from its ``run_state`` row (None: no such run)."""
    if state is None:
        return ClaimRefused(run_id, "not_found", None)
    status = state["status"]
    if status in ("completed", "failed", "cancelled"):
        return ClaimRefused(run_id, "finished", status)
    if state["blocked_key"] is not None:  # over a concurrency limit (flowcontrol)
        return ClaimRefused(run_id, "blocked", status)
    if state["leased"]:
        return ClaimRefused(run_id, "leased", status)
    starts_in = None
    if state["throttled"] and status == "queued" and state["due_at"] is not None:
        starts_in = max(0.0, (state["due_at"] - state["now"]).total_seconds())
    return ClaimRefused(
        run_id, "not_due", status, starts_in=starts_in, late=state["rate_exchanged"]
    )


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class Engine:
    """Claims runs and executes their segments."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        *,
        lease: timedelta = timedelta(seconds=30),
        dispatch_lease: timedelta = timedelta(seconds=30),
        default_retry: RetryPolicy = DEFAULT_RETRY,
        record_step_inputs: bool = True,
        executor: StepExecutor | None = None,
        unknown_workflow_grace: timedelta = timedelta(days=1),
        max_parallel_steps: int = 16,
        max_children: int = 100,
        step_rates: StepRates | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.lease = lease
        self.dispatch_lease = dispatch_lease
        self.default_retry = default_retry
        self.record_step_inputs = record_step_inputs
        self.executor = executor or StepExecutor()
        self.stream_max_messages = 10_000
        self.stream_max_bytes = 64 * 1024
        # Set by FlowKeeper: what ctx.send_event and ctx.create_token use.
        self.events: EventBus | None = None
        self.tokens: TokenSigner | None = None
        self.unknown_workflow_grace = unknown_workflow_grace
        # How many step bodies of one run may execute at once in one invocation
        # (branches of asyncio.gather / ctx.map beyond it wait for a slot).
        self.max_parallel_steps = max_parallel_steps
        # Child runs (flowkeeper.children): how many of one parent's children
        # may be live at once by default, and how a started child is pushed
        # (set by FlowKeeper: a signed invocation, sent in the background).
        self.max_children = max_children
        # Rate limits on single steps, by name (flowkeeper.steprates).
        self.step_rates = step_rates or StepRates(store, {})
        self.push: Callable[[str, uuid.UUID], None] | None = None
        # Step logs, tracing, metrics (flowkeeper.observe): called at the "# observe:" points.
        self.observers = observe.Observers()

    async def claim(
        self, run_id: str, token: uuid.UUID | None, *, reach: float = 0.0
    ) -> ClaimedRun | ClaimRefused:
        """Take the run's lease, or say why not.

        ``reach`` (seconds): how long this invocation would wait for the start
        time of a rate-limited run that is claimed late (flowkeeper.flowcontrol):
        the run takes a new time within it, if there is one.
        """
        claimed = await self.store.claim(
            run_id, token, uuid.uuid4(), self.lease, reach=timedelta(seconds=max(0.0, reach))
        )
        if claimed is not None:
            return claimed
        return _refusal(run_id, await self.store.run_state(run_id))

    def start_wait(self, refused: ClaimRefused, reach: float) -> float | None:
        """How long to wait before claiming a run throttled by its rate limit
        again, when that is worth doing in this invocation; else None.

        A start time within :data:`~flowkeeper.flowcontrol.START_WAIT` is
        waited for; so is one within ``reach`` that a late wake took: under a
        driver coarser than the spacing, nobody else would claim it on time.
        """
        if refused.starts_in is None:
            return None
        limit = max(reach, flowcontrol.START_WAIT) if refused.late else flowcontrol.START_WAIT
        return refused.starts_in if refused.starts_in <= limit else None

    async def claim_when_due(
        self, refused: ClaimRefused, *, reach: float
    ) -> ClaimedRun | ClaimRefused:
        """Wait for a throttled run's start time (see :meth:`start_wait`) and
        claim it then; a late run may need a second wait for the time it takes
        once within reach.  Another driver may claim it first: then refused."""
        give_up = time.monotonic() + max(reach, flowcontrol.START_WAIT)
        result: ClaimedRun | ClaimRefused = refused
        for _ in range(3):
            if not isinstance(result, ClaimRefused):
                break
            wait = self.start_wait(result, reach)
            if wait is None or time.monotonic() + wait > give_up:
                break
            end = time.monotonic() + wait
            while (left := end - time.monotonic()) > 0:
                # In steps of a second, so that a cancel meanwhile ends the wait.
                await asyncio.sleep(min(left, 1.0))
                if left > 1.0:
                    why = _refusal(result.run_id, await self.store.run_state(result.run_id))
                    if why.reason in ("not_found", "finished"):
                        return why
            result = await self.claim(result.run_id, None, reach=give_up - time.monotonic())
        return result

    async def create(
        self,
        run_id: str,
        workflow: str,
        input_json: str,
        idempotency_key: str | None,
        *,
        reach: float = 0.0,
    ) -> ClaimedRun | ClaimRefused | str:
        """Create a run handed over by trigger() and take its lease at once.

        Returns the claimed run; or, when ``run_id`` already exists (a replayed
        request, or trigger() inserted it itself after losing the answer), the
        outcome of claiming it as usual; or, when the idempotency key belongs
        to another run, that run's id.
        """
        wf = self.registry.get(workflow) if workflow in self.registry else None
        if wf is not None and wf.flow_controlled:  # through the flow gate (flowcontrol)
            gated = await self.store.create_gated(
                run_id=run_id,
                workflow=workflow,
                input_json=input_json,
                idempotency_key=idempotency_key,
                lease=self.lease,
                flow=wf.flow(input_json),
                priority=wf.priority,
                timeout=wf.timeout,
                start_timeout=wf.start_timeout,
                code_version=wf.version,
            )
            if isinstance(gated, ClaimedRun) or (isinstance(gated, tuple) and not gated[1]):
                return gated if isinstance(gated, ClaimedRun) else gated[0]
            # Why not (or an earlier create's replay).
            return await self.claim(run_id, None, reach=reach)
        result = await self.store.create_claimed(
            run_id=run_id,
            workflow=workflow,
            input_json=input_json,
            idempotency_key=idempotency_key,
            lease_token=uuid.uuid4(),
            lease=self.lease,
            code_version=self.registry.get(workflow).version if workflow in self.registry else None,
        )
        if isinstance(result, ClaimedRun):
            return result
        existing, same = result
        if same:
            return await self.claim(run_id, None, reach=reach)
        return existing

    def knows(self, workflow: str) -> bool:
        return workflow in self.registry

    async def execute(self, claimed: ClaimedRun, *, deadline: float) -> SegmentResult:
        """Run the claimed run's workflow until it finishes, waits, or the budget ends.

        ``deadline`` is a ``time.monotonic()`` value after which no new step starts.
        """
        try:
            workflow = self.registry.get(claimed.workflow)
        except UnknownWorkflowError as exc:
            return await self._unknown_workflow(claimed, exc)
        execution = Execution(self, claimed, workflow, deadline)
        return await execution.observed.invocation(execution.run)  # observe: invocation

    async def _unknown_workflow(
        self, claimed: ClaimedRun, exc: UnknownWorkflowError
    ) -> SegmentResult:
        """Not known here (a rolling deploy?): defer the run; fail it once the grace is over."""
        outcome = await deploys.defer(
            self.store, claimed, known=self.registry.names(), grace=self.unknown_workflow_grace
        )
        if outcome is None:
            return SegmentResult(claimed.run_id, Outcome.LEASE_LOST, 0)
        if isinstance(outcome, deploys.Deferral):
            logger.warning(
                "run %s: workflow %r is not registered in this process (known: %s); deferred, "
                "tries again in %.0fs, fails after %s",
                claimed.run_id,
                claimed.workflow,
                ", ".join(outcome.known) or "none",
                outcome.retry_in,
                outcome.fails_at.isoformat(timespec="seconds"),
            )
            return SegmentResult(
                claimed.run_id,
                Outcome.DEFERRED,
                0,
                due_at=outcome.retry_at,
                deferral=outcome,
            )
        logger.error("run %s: %s %s", claimed.run_id, exc, outcome.note)
        return await self._fail_unrecorded(
            claimed, exc, note=outcome.note, events=[outcome.event()]
        )

    async def _fail_unrecorded(
        self,
        claimed: ClaimedRun,
        exc: BaseException,
        *,
        note: str | None = None,
        events: list[EventRecord] | None = None,
    ) -> SegmentResult:
        error = error_info(exc)
        error["traceback"] = None
        if note:
            error["message"] = f"{error['message']} {note}"
        ok = await self.store.commit(
            claimed.run_id, claimed.lease_token, status="failed", error=error, events=events or ()
        )
        outcome = Outcome.FAILED if ok is not False else Outcome.LEASE_LOST
        return SegmentResult(claimed.run_id, outcome, 0, error=error)


class Execution:
    """One invocation's replay of one run (used through :class:`Context`)."""

    def __init__(
        self,
        engine: Engine,
        claimed: ClaimedRun,
        workflow: Workflow,
        deadline: float,
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.claimed = claimed
        self.run_id = claimed.run_id
        self.token = claimed.lease_token
        self.workflow = workflow
        # Its writes may release concurrency slots (Store.commit's ``flow``).
        self._flow = bool(workflow.concurrency)
        self.deadline = deadline
        self._t0 = time.monotonic()
        # Patch markers take no position (flowkeeper.patches): kept aside.
        self._history, markers = patches.split(claimed.history)
        self._patches = patches.PatchState(markers)
        # History is looked up by position while the workflow runs one ctx call
        # after another (a renamed or moved step is a determinism error), and by
        # key inside concurrent branches, whose calls may come in any order.
        self._by_position = {entry.position: entry for entry in self._history}
        self._by_key = {entry.key: entry for entry in self._history}
        self._reached: set[str] = set()  # keys of the history entries replayed so far
        self._position = 0
        self._occurrences: dict[str, int] = {}
        self._pending_steps: list[StepRecord] = []
        self._inputs = InputRecorder(enabled=engine.record_step_inputs)
        self._pending_events: list[EventRecord] = []
        self._executed = 0
        # Parallel branches (asyncio.gather, ctx.parallel, ctx.map): see "branches" below.
        self._branches: set[asyncio.Task[Any]] = set()
        self._region: _Region | None = None
        self._active = 0  # ctx operations in progress and not parked
        self._parked: dict[int, _Park] = {}  # by id(park): one key may park twice
        self._idle: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(engine.max_parallel_steps)
        self._bodies: set[asyncio.Task[Any]] = set()  # tasks running a step body now
        self._body_ended = asyncio.Event()
        self._ending: asyncio.Future[SegmentResult] | None = None
        # Set once the segment's outcome is known (a suspension written, the
        # lease lost...): every later ctx call ends the same way, so a branch
        # that swallowed the suspension (gather(return_exceptions=True)) cannot
        # go on, and the workflow's return value is not taken for a completion.
        self._ended: SegmentResult | None = None
        self._closed = False  # the workflow function has returned: ctx calls are refused
        self._loop_thread = threading.get_ident()
        self._lease_lost = False
        self._broken: WorkflowError | None = None
        # Attempts that died with earlier invocations, charged to the frontier step.
        self._lost_attempts = claimed.lost_attempts
        self._cancelled = False  # the run was cancelled under this invocation
        self._interrupted: str | None = None  # why this invocation cancelled its step bodies
        self._task: asyncio.Task[Any] | None = None
        # The run's stream (flowkeeper.streams) and the step attempt running now.
        self._publisher = Publisher(
            self.store,
            self.run_id,
            max_messages=engine.stream_max_messages,
            max_bytes=engine.stream_max_bytes,
        )
        # The sync step threads running now: if the host cancels this invocation
        # while one runs, the lease is kept alive until it returns (see run()).
        self._threads: set[asyncio.Future[Any]] = set()
        self._writing = asyncio.Lock()
        self.observed = engine.observers.bind(claimed)  # observe: this execution's observers

    # clock ---------------------------------------------------------------
    def db_time(self) -> datetime:
        """The database clock now, from the claim's reading plus elapsed time."""
        return self.claimed.db_now + timedelta(seconds=time.monotonic() - self._t0)

    # driver --------------------------------------------------------------
    async def run(self) -> SegmentResult:
        self._task = asyncio.current_task()
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            return await self._run()
        except _Suspend as suspend:  # a write after the workflow function returned
            return suspend.result
        except _Abort as abort:
            raise abort.error from abort.error.__cause__
        finally:
            heartbeat.cancel()
            self._closed = True
            for task in self._branches:  # a branch still alive here has lost its run
                task.cancel()
            if self._idle is not None:
                self._idle.cancel()
            await self._publisher.close()
            for thread in self._threads:
                if not thread.done():
                    self._hold_until_thread_ends(thread)

    def _hold_until_thread_ends(self, thread: asyncio.Future[Any]) -> None:
        """The invocation ends (cancelled by its host) while a sync step's thread runs on.

        Python cannot stop the thread, so the lease is renewed until it
        returns: no other invocation may start the step beside it.  Then the
        lease runs out, and the next claim counts the attempt as lost.
        """
        logger.warning(
            "run %s: the invocation was cancelled while a sync step was running; its lease "
            "is kept until the step's thread returns",
            self.run_id,
        )
        store, run_id, token, lease = self.store, self.run_id, self.token, self.engine.lease

        async def keep() -> None:
            while not thread.done():
                with contextlib.suppress(Exception):
                    if await store.heartbeat(run_id, token, lease) is None:
                        return
                with contextlib.suppress(Exception):
                    await asyncio.wait({thread}, timeout=max(0.05, lease.total_seconds() / 3))

        task = asyncio.get_running_loop().create_task(keep())
        _HOLDERS.add(task)
        task.add_done_callback(_HOLDERS.discard)

    # the run's stream -------------------------------------------------------------------------
    def publish(self, topic: str, data: Any) -> None:
        """Queue a message on the run's stream (thread-safe: sync steps call it too)."""
        step = _step_now(self)
        if step is None and len(self._reached) < len(self._history):
            # The workflow function is replaying recorded history: it was sent then.
            check_topic(topic)
            return
        self._publisher.add(topic, data, step[0] if step else None, step[1] if step else None)

    async def _write(self, status: str, **fields: Any) -> datetime | bool | None:
        """Commit under the lease.

        A lost database aborts the invocation (the lease brings the run back);
        a value Postgres refuses for good fails the run with that message
        instead, so the same write is never attempted again and again.
        """
        # One write at a time, in the order they were asked for: the final write of
        # a run whose asyncio.gather was refused must not overtake the flush a
        # sibling started just before (whose records it would then leave out).
        async with self._writing:
            return await self._commit(status, **fields)

    async def _commit(self, status: str, **fields: Any) -> datetime | bool | None:
        """One write, with ``self._writing`` held."""
        try:
            await self._publisher.flush()  # a step's messages are stored before its result
            return await self.store.commit(
                self.run_id, self.token, status=status, flow=self._flow, **fields
            )
        except DatabaseRefusedError as exc:
            raise await self._refused(exc) from exc
        except DatabaseError as exc:
            raise _Abort(exc) from exc

    async def _refused(self, exc: DatabaseRefusedError) -> _Suspend:
        logger.error("run %s: %s; the run fails with this error", self.run_id, exc)
        error = error_info(exc)
        error["traceback"] = None

        async def fail() -> SegmentResult:
            # Failing the run lets go of it, and a failed run may be replayed:
            # not while a step thread of this invocation still runs (a sibling
            # branch's, or the hung one whose report was refused).
            while live := [t for t in self._threads if not t.done()]:
                await asyncio.wait(live)
            try:
                ok = await self.store.commit(self.run_id, self.token, status="failed", error=error)
            except DatabaseRefusedError as again:  # pragma: no cover - the error is plain text
                raise _Abort(DatabaseError(str(again))) from again
            except DatabaseError as lost:
                raise _Abort(lost) from lost
            if ok is False:
                return await self._lost_now()
            return SegmentResult(self.run_id, Outcome.FAILED, self._executed, error=error)

        # The other branches' bodies are stopped first, as for any end of the segment.
        return _Suspend(await self._end_once("refused", fail))

    async def _heartbeat(self) -> None:
        interval = max(0.05, self.engine.lease.total_seconds() / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                status = await self.store.heartbeat(self.run_id, self.token, self.engine.lease)
            except Exception as exc:  # the next write will tell for sure
                logger.warning("run %s: lease heartbeat failed: %s", self.run_id, exc)
                continue
            if status is None:
                logger.warning(
                    "run %s: lease taken over by another invocation; this one stops its step "
                    "and writes nothing more",
                    self.run_id,
                )
                self._lease_lost = True
                self._interrupt("lease_lost")
                return
            if status == "cancelled" and not self._cancelled:
                # The lease stays ours (the heartbeat goes on) until the step has
                # really ended: only then may the run be replayed.
                logger.info("run %s: cancelled; stopping its step", self.run_id)
                self._cancelled = True
                self._interrupt("cancelled")

    def _interrupt(self, reason: str) -> None:
        """Cancel the step bodies running now, if any (a sync one is waited for).

        The reason is kept (never reset): every branch whose body is stopped
        reads it, and the invocation ends after an interruption.
        """
        if self._bodies and self._interrupted is None:
            self._interrupted = reason
            current = asyncio.current_task()  # a body ending the segment itself goes on
            for task in list(self._bodies):
                if task is not current:
                    task.cancel()

    async def _run(self) -> SegmentResult:
        ctx = Context(self)
        try:
            args: tuple[Any, ...] = (ctx,)
            if self.workflow.takes_input:
                try:
                    # flowkeeper.codec: a sealed input is opened here (a missing key fails the run).
                    args = (
                        ctx,
                        self.workflow.load_input(self.store.sealer.open_json(self.claimed.input)),
                    )
                    self._inputs.produced(args[1], "$input")
                except (SerializationError, InvalidInputError) as exc:
                    raise WorkflowError(
                        f"The stored input of run {self.run_id} no longer matches the input "
                        f"annotation of workflow {self.workflow.name!r} (the code changed under "
                        f"a live run): {exc}"
                    ) from exc
            if self.workflow.cancel_on and not self._history:
                await self._register_cancel_rules(args[1] if len(args) > 1 else None)
            value = await self.workflow.fn(*args)
        except _Suspend as suspend:
            await self._settle()
            return suspend.result
        except StepFailedError as exc:
            await self._settle()
            if self._ended is not None:
                return self._ended
            if self._broken is not None:
                return await self._finish_failed(self._broken)
            error = {
                "type": exc.error_type,
                "message": exc.message,
                "traceback": exc.traceback,
                "step": exc.step,
                "attempts": exc.attempts,
            }
            return await self._finish_failed(exc, error=error)
        except Exception as exc:
            await self._settle()
            if self._ended is not None:
                return self._ended
            return await self._finish_failed(self._broken or exc)
        await self._settle()
        if self._ended is not None:  # a suspension swallowed by the workflow (see _ended)
            return self._ended
        if self._broken is not None:
            return await self._finish_failed(self._broken)
        unreached = [e for e in self._history if e.key not in self._reached]
        if unreached:
            entry = unreached[0]
            return await self._finish_failed(
                DeterminismError(
                    f"Run {self.run_id}: the workflow returned, but its history records "
                    f"{entry.kind} {entry.key!r} at position {entry.position} that the code "
                    "no longer reaches (a recorded step was removed). Restore the step, or "
                    "let this run fail and trigger a new one; to remove steps under live "
                    "runs, keep them behind `if not ctx.patched('<change-id>'):` "
                    "(README: Versioning).",
                    step=entry.key,
                    position=entry.position,
                )
            )
        if self._cancelled:
            return await self._stopped(None, 0)
        try:
            output = self.workflow.dump_output(value)
        except SerializationError as exc:
            return await self._finish_failed(exc)
        steps, events = self._take_pending()
        ok = await self._write("completed", output=output, steps=steps, events=events)
        if ok is False:
            return await self._lost()
        logger.debug("run %s completed (%d steps this invocation)", self.run_id, self._executed)
        return SegmentResult(self.run_id, Outcome.COMPLETED, self._executed)

    async def _finish_failed(
        self, exc: BaseException, *, error: dict[str, Any] | None = None
    ) -> SegmentResult:
        if error is None:
            error = error_info(exc)
            if isinstance(exc, DeterminismError):
                error.update(step=exc.step, position=exc.position)
        logger.warning("run %s failed: %s: %s", self.run_id, error["type"], error["message"])
        steps, events = self._take_pending()
        ok = await self._write("failed", error=error, steps=steps, events=events)
        if ok is False:
            return await self._lost()
        return SegmentResult(self.run_id, Outcome.FAILED, self._executed, error=error)

    async def _end_once(self, reason: str, end: Callable[[], Any]) -> SegmentResult:
        """Let go of the run once, whichever branch finds out first.

        The other branches' step bodies are stopped (a sync one is waited for)
        before the run is let go of, so that no replay can start a step while
        one of this invocation's bodies still runs; those branches then end
        with the same result.
        """
        if self._ending is not None:
            return await asyncio.shield(self._ending)
        ending = self._ending = asyncio.get_running_loop().create_future()
        try:
            current = asyncio.current_task()
            self._interrupt(reason)
            while any(t is not current for t in self._bodies):
                self._body_ended.clear()
                await self._body_ended.wait()
            result: SegmentResult = await end()
        except BaseException as exc:
            ending.set_exception(exc)
            ending.exception()  # retrieved: the branches that wait for it re-raise it
            raise
        self._ended = result
        ending.set_result(result)
        return result

    async def _lost(self) -> SegmentResult:
        """A write was refused: the run was cancelled meanwhile, or another invocation has it."""
        return await self._end_once("lease_lost", self._lost_now)

    async def _lost_now(self) -> SegmentResult:
        with contextlib.suppress(DatabaseError, DatabaseRefusedError):
            if await self.store.release_stopped(
                self.run_id, self.token, {"how": "stopped before its next write"}
            ):
                logger.info("run %s: cancelled; this invocation stopped", self.run_id)
                return SegmentResult(self.run_id, Outcome.CANCELLED, self._executed)
        logger.warning(
            "run %s: lease lost (another invocation took over or the run was cancelled); "
            "nothing from this invocation was written",
            self.run_id,
        )
        return SegmentResult(self.run_id, Outcome.LEASE_LOST, self._executed)

    async def _stopped(self, key: str | None, attempt: int, how: str = "") -> SegmentResult:
        """The run was cancelled under this invocation, which has now stopped: let go of it."""
        return await self._end_once(
            "cancelled", functools.partial(self._stopped_now, key, attempt, how)
        )

    async def _stopped_now(self, key: str | None, attempt: int, how: str) -> SegmentResult:
        detail: dict[str, Any] = {"how": how or "stopped between steps"}
        if key is not None:
            detail.update(step=key, attempt=attempt)
        try:
            await self.store.release_stopped(self.run_id, self.token, detail)
        except (DatabaseError, DatabaseRefusedError) as exc:
            logger.warning(
                "run %s: could not release the cancelled run (%s); it is free once its lease "
                "expires",
                self.run_id,
                exc,
            )
        logger.info("run %s: cancelled; %s", self.run_id, detail["how"])
        return SegmentResult(self.run_id, Outcome.CANCELLED, self._executed)

    async def _suspend(
        self,
        outcome: Outcome,
        *,
        status: str,
        due_in: timedelta | None = None,
        due_at: datetime | None = None,
        new_token: uuid.UUID | None = None,
        error: dict[str, Any] | None = None,
        step_key: str | None = None,
        step_attempt: int = 0,
        extra_steps: list[StepRecord] | None = None,
    ) -> _Suspend:
        steps, events = self._take_pending()
        result = await self._write(
            status,
            new_token=new_token,
            due_in=due_in,
            due_at=due_at,
            error=error,
            step_key=step_key,
            step_attempt=step_attempt,
            steps=steps + (extra_steps or []),
            events=events,
        )
        if result is False:
            return _Suspend(await self._lost())
        due = result if isinstance(result, datetime) else None
        self._ended = SegmentResult(
            self.run_id,
            outcome,
            self._executed,
            due_at=due,
            handoff_token=new_token,
            error=error,
        )
        return _Suspend(self._ended)

    # history -------------------------------------------------------------
    def _check_name(self, name: str, kind: str) -> None:
        try:
            validate_name(name, kind)
        except WorkflowError as exc:
            raise StepUsageError(str(exc)) from None
        if "#" in name:
            raise StepUsageError(
                f"The {kind} name {name!r} contains '#', which flowkeeper keeps for the "
                "occurrence numbers it gives a name repeated in one run (name#2, name#3...). "
                "Use another character, e.g. 'sync-2' or 'sync:2'."
            )

    def _next(self, name: str, kind: str) -> tuple[str, int, HistoryEntry | None]:
        """Take the next position in the history for a ctx operation.

        Every ctx operation calls this before its first await, and marks its
        end with ``self._busy = None`` (the operation counter, see below).
        """
        task = self._caller(name, kind)
        self._check_name(name, kind)
        concurrent = self._concurrent(task)
        count = self._occurrences.get(name, 0) + 1
        key = name if count == 1 else f"{name}#{count}"
        if concurrent:
            key, position, entry = self._next_in_branch(task, name, kind, key)
        else:
            position = self._position
            entry = self._by_position.get(position)
            if entry is not None and (entry.key != key or entry.kind != kind):
                raise self._break(
                    DeterminismError(
                        f"Run {self.run_id}: at position {position} the workflow now calls "
                        f"{kind} {key!r}, but the recorded history has {entry.kind} "
                        f"{entry.key!r} there (a recorded step was renamed, removed or "
                        "moved). Nothing recorded was run again. Restore the previous order "
                        "of steps, or let this run fail and trigger a new one; to change "
                        "steps under live runs, put the change behind "
                        "`if ctx.patched('<change-id>'):` (README: Versioning).",
                        step=key,
                        position=position,
                    )
                )
        self._occurrences[name] = count
        self._position += 1
        if entry is not None:
            self._reached.add(entry.key)
        self._active += 1
        return key, position, entry

    def _break(self, error: WorkflowError) -> WorkflowError:
        """The workflow misuses ctx or no longer matches its history: the run fails with it."""
        self._broken = error
        return error

    def _caller(self, name: str, kind: str) -> asyncio.Task[Any] | None:
        """Refuse a ctx call from where it cannot be recorded deterministically."""
        if self._ended is not None:
            raise _Suspend(self._ended)
        if self._broken is not None:
            raise self._broken
        if threading.get_ident() != self._loop_thread:
            raise self._break(
                StepUsageError(
                    f"Run {self.run_id}: {kind} {name!r} was called from another thread (a "
                    "sync step function, or a thread it started). ctx calls belong in the "
                    "workflow function itself: return what the step computed and call "
                    "ctx there."
                )
            )
        inside = _STEP.get()
        if inside is not None:
            raise self._break(
                StepUsageError(
                    f"Run {self.run_id}: {kind} {name!r} was called inside the step "
                    f"{inside[1]!r} (a ctx call inside a step function). Step "
                    "functions do the work; ctx calls belong in the workflow function."
                )
            )
        if self._closed:
            logger.error(
                "run %s: %s %r was called after the workflow function returned", self.run_id,
                kind, name,
            )  # fmt: skip
            raise StepUsageError(
                f"Run {self.run_id}: {kind} {name!r} was called after the workflow function "
                "returned (from a task it started and did not await). Await every branch, "
                "e.g. with asyncio.gather or ctx.parallel, before the workflow returns."
            )
        return asyncio.current_task()

    # branches (asyncio.gather, ctx.parallel, ctx.map) ------------------------------------
    #
    # A ctx call made from a task other than the workflow function's own, or
    # while such a task is alive, is in a *region* of concurrent branches.
    # There the order of calls depends on which branch finishes first, so:
    # - history is matched by key, not position (positions only order the
    #   timeline; a region fills the position range its calls take);
    # - a name repeated in two branches is refused (its occurrence numbers
    #   would depend on timing), so are waits for events and tokens;
    # - results are written as soon as they arrive (not deferred to the next
    #   step), so a crash re-runs only the unfinished branches;
    # - a branch that must wait (a retry's backoff, ctx.sleep, the time budget)
    #   *parks*; when every operation in flight is parked, the run suspends
    #   until the earliest due time (_suspend_when_idle);
    # - a lost invocation is charged as one attempt to every step of the
    #   region that starts after it (which of them were in flight is unknown).
    @property
    def _busy(self) -> None:
        """Kept for the ctx operations' ``finally: self._busy = None`` (the operation ended)."""
        return None

    @_busy.setter
    def _busy(self, value: None) -> None:
        self._active -= 1
        self._check_idle()

    def _concurrent(self, task: asyncio.Task[Any] | None) -> bool:
        if task is not None and task is not self._task and task not in self._branches:
            self._adopt(task)
        concurrent = bool(self._branches)
        if concurrent and self._region is None:
            self._region = _Region(start=self._position, lost=0)
        return concurrent

    def _adopt(self, task: asyncio.Task[Any]) -> None:
        """Count ``task`` as a branch of the workflow until it ends."""
        self._branches.add(task)
        task.add_done_callback(self._branch_done)

    def _branch_done(self, task: asyncio.Task[Any]) -> None:
        self._branches.discard(task)
        if not self._branches:
            self._region = None  # the next call, if sequential, is checked by position again

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Start a branch of the workflow (ctx.parallel, ctx.map)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._adopt(task)
        return task

    async def _park(self, key: str, kind: str, due: datetime | None) -> None:
        """Wait in this branch until ``due`` (None: until the run suspends).

        Returns when the due time has come while other branches still work;
        raises the run's suspension when every operation in flight is parked.
        """
        loop = asyncio.get_running_loop()
        park = _Park(kind, due, loop.create_future(), key)
        self._parked[id(park)] = park
        self._active -= 1
        timer = None
        if due is not None:
            delay = max(0.0, (due - self.db_time()).total_seconds())
            timer = loop.call_later(delay, _wake, park.woken)
        self._check_idle()
        try:
            await park.woken
        finally:
            if timer is not None:
                timer.cancel()
            self._parked.pop(id(park), None)
            self._active += 1

    def _check_idle(self) -> None:
        if self._parked and self._active <= 0 and self._idle is None and self._ended is None:
            self._idle = asyncio.get_running_loop().create_task(self._suspend_when_idle())

    async def _suspend_when_idle(self) -> None:
        """Every operation in flight is parked: suspend the run until the earliest due time."""
        try:
            # A branch whose operation just ended calls its next one without
            # awaiting anything in between: give it the chance first.
            for _ in range(3):
                await asyncio.sleep(0)
            parks = list(self._parked.values())
            if self._active > 0 or not parks or any(p.woken.done() for p in parks):
                return
            suspension: BaseException
            try:
                suspension = await self._suspend_parked(parks)
            except (_Suspend, _Abort) as exc:
                suspension = exc
            except _Resolved as resolved:  # waits for children resolved meanwhile: go on
                for park in parks:
                    if park.kind == "children" and park.key in resolved.keys:
                        _wake(park.woken)
                return
            for park in list(self._parked.values()):
                if not park.woken.done():
                    park.woken.set_exception(suspension)
        finally:
            self._idle = None

    async def _suspend_parked(self, parks: list[_Park]) -> _Suspend:
        if any(p.kind == "handoff" for p in parks):
            return await self._suspend(
                Outcome.HANDOFF,
                status="running",
                new_token=uuid.uuid4(),
                due_in=self.engine.dispatch_lease,
            )
        dues = [p.due for p in parks if p.due is not None]
        if any(p.kind == "children" for p in parks):
            return await self._suspend_for_children(parks, min(dues) if dues else None)
        due = min(dues)
        retrying = any(p.kind == "retry" and p.due == due for p in parks)
        return await self._suspend(
            Outcome.RETRYING if retrying else Outcome.SLEEPING,
            status="retrying" if retrying else "sleeping",
            due_at=due,
        )

    async def _suspend_for_children(self, parks: list[_Park], due: datetime | None) -> _Suspend:
        """Branches wait for children (and maybe retries, sleeps): suspend until the first."""
        await self._flush()
        keys = sorted({p.key for p in parks if p.kind == "children"})
        try:
            done = await self.store.suspend_for_children(self.run_id, self.token, keys, due)
        except Exception as exc:
            raise self._database_failure(exc) from exc
        if done is None:
            return _Suspend(await self._lost())
        if done:
            raise _Resolved(done)
        return _Suspend(self._segment(Outcome.WAITING, due_at=due))

    async def _settle(self) -> None:
        """The workflow function has ended: stop the branches it left running.

        (asyncio.gather lets the other branches run on after one fails.)  Their
        step bodies are cancelled, a sync one is waited for, and what they
        finished is in the run's next write.
        """
        self._closed = True
        current = asyncio.current_task()
        left = [t for t in self._branches if t is not current and not t.done()]
        if not left:
            return
        if self._interrupted is None:
            self._interrupted = "settle"
        for task in left:
            task.cancel()
        await asyncio.wait(left)
        for task in left:  # retrieved, so asyncio does not log them as lost
            if not task.cancelled():
                task.exception()

    def _next_in_branch(
        self, task: asyncio.Task[Any] | None, name: str, kind: str, key: str
    ) -> tuple[str, int, HistoryEntry | None]:
        region = self._region
        assert region is not None
        owner = region.owners.setdefault(name, task)
        if owner is not task:
            raise self._break(
                StepUsageError(
                    f"Run {self.run_id}: {kind} {name!r} is called by two concurrent branches; "
                    "which one gets which occurrence number would depend on which finishes "
                    f"first. Give each branch its own name (e.g. f'{name}:{{i}}'), or use "
                    f"ctx.map({name!r}, fn, items), which keys each item by its index."
                )
            )
        if kind == "wait":
            raise self._break(
                StepUsageError(
                    f"Run {self.run_id}: wait {name!r} is inside concurrent branches "
                    "(asyncio.gather, ctx.parallel or ctx.map). Waiting for an event or a "
                    "token suspends the whole run; await it before or after the branches."
                )
            )
        entry = self._by_key.get(key)
        if entry is not None:
            if entry.kind != kind:
                raise self._break(
                    DeterminismError(
                        f"Run {self.run_id}: the workflow now calls {kind} {key!r}, but the "
                        f"recorded history has a {entry.kind} of that name. Restore the "
                        "previous code, or let this run fail and trigger a new one; to change "
                        "steps under live runs, put the change behind "
                        "`if ctx.patched('<change-id>'):` (README: Versioning).",
                        step=key,
                        position=entry.position,
                    )
                )
            return key, entry.position, entry
        position = max(region.start, region.next_free)
        while position in self._by_position:
            position += 1
        region.next_free = position + 1
        return key, position, None

    async def _throttle(self, key: str, attempt: int, rate: str) -> None:
        """Wait for this attempt's start time under step rate limit ``rate``
        (flowkeeper.steprates): in this invocation when it is near, else the run
        sleeps until then, its ticket kept for the resumed run."""
        if self._lease_lost or self._cancelled:
            return  # _before_new_work ends the segment; take no start time for it
        left = self.deadline - time.monotonic()
        if self._executed > 0 and left <= 0:
            return  # the run is handed on first; the continuation takes the time
        horizon = min(steprates.MAX_WAIT, max(0.0, left))
        try:
            ticket = await self.engine.step_rates.take(
                self.run_id, key, attempt, rate, horizon, late_horizon=max(horizon, left / 2)
            )
        except Exception as exc:
            raise self._database_failure(exc) from exc
        if not ticket.kept:  # near enough: wait for it here
            end = time.monotonic() + ticket.wait
            # In short sleeps, so that a cancel or a lost lease ends the wait.
            while not (self._cancelled or self._lease_lost):
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(remaining, 0.25))
            return
        if ticket.fresh:
            logger.info(
                "run %s: step %r attempt %d waits for rate limit %r until %s",
                self.run_id,
                key,
                attempt,
                rate,
                ticket.slot.isoformat(),
            )
            self._pending_events.append(
                EventRecord(
                    "throttled",
                    step_key=key,
                    attempt=attempt,
                    detail={"rate_limit": rate, "until": ticket.slot.isoformat()},
                )
            )
        if self._branches:
            # This branch waits for its time (the others go on), or the run
            # sleeps once every branch waits.
            await self._park(key, "sleep", ticket.slot)
            await self._throttle(key, attempt, rate)  # its time has come: use the ticket
            return
        raise await self._suspend(
            Outcome.SLEEPING,
            status="sleeping",
            due_at=ticket.slot,
            step_key=key,  # its attempts so far, as a retry's suspension keeps them
            step_attempt=attempt - 1,
        )

    async def _before_new_work(self, *, step_key: str | None = None, step_attempt: int = 0) -> None:
        """Flush deferred records and check the lease, cancellation and the time budget.

        ``step_key``/``step_attempt``: the step about to start and its attempts
        so far, kept on the run by any write made now.
        """
        if self._lease_lost:
            raise _Suspend(await self._lost())
        if self._cancelled:
            raise _Suspend(await self._stopped(None, 0))
        if self._branches:
            if self._executed > 0 and time.monotonic() >= self.deadline:
                # Budget used: this branch starts nothing more; once every branch
                # has stopped, the run is handed on (see _suspend_when_idle).
                await self._park(step_key or "", "handoff", None)
            await self._flush()
            return
        if self._executed > 0 and time.monotonic() >= self.deadline:
            # Budget used: hand the run on with a fresh token for the continuation.
            raise await self._suspend(
                Outcome.HANDOFF,
                status="running",
                new_token=uuid.uuid4(),
                due_in=self.engine.dispatch_lease,
                step_key=step_key,
                step_attempt=step_attempt,
            )
        if self._pending_steps or self._pending_events:
            steps, events = self._take_pending()
            result = await self._write(
                "running",
                new_token=self.token,
                keep_due=True,
                step_key=step_key,
                step_attempt=step_attempt,
                steps=steps,
                events=events,
            )
            if result is False:
                raise _Suspend(await self._lost())

    async def _flush(self) -> None:
        """Write the records not written yet now, keeping the lease (branches' results).

        Branches finishing together share a write: one that finds another in
        progress waits for it and then writes whatever is still pending.
        """
        if not (self._pending_steps or self._pending_events):
            return
        async with self._writing:
            steps, events = self._take_pending()
            if not (steps or events):
                return
            result = await self._commit(
                "running", new_token=self.token, keep_due=True, steps=steps, events=events
            )
        if result is False:
            raise _Suspend(await self._lost())

    def _take_pending(self) -> tuple[list[StepRecord], list[EventRecord]]:
        """The records not written yet, handed to one write (never to two at once)."""
        steps, events = self._pending_steps, self._pending_events
        self._pending_steps, self._pending_events = [], []
        return steps, events

    # steps ---------------------------------------------------------------
    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        retry: RetryPolicy | None,
        timeout: float | timedelta | None,
        rate_limit: str | None = None,
    ) -> Any:
        if not callable(fn):
            raise StepUsageError(f"ctx.step({name!r}, ...) needs a function, got {fn!r}")
        if rate_limit is not None:
            self.engine.step_rates.check(name, rate_limit)
        if timeout is not None:
            seconds = _seconds(timeout)
            if not 0 < seconds < float("inf"):
                raise StepUsageError(
                    f"ctx.step({name!r}, ...): timeout must be a positive, finite number of "
                    f"seconds or a timedelta, got {timeout!r}."
                )
        key, position, entry = self._next(name, "step")
        try:
            return await self._step(
                key, position, name, entry, fn, args, kwargs, retry, timeout, rate=rate_limit
            )
        finally:
            self._busy = None

    async def transaction(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        retry: RetryPolicy | None,
        timeout: float | timedelta | None,
        isolation: str,
        pool: Any,
    ) -> Any:
        """ctx.transaction: a step whose record commits with the user's writes (transactions)."""
        from . import transactions

        level = transactions.check_call(name, fn, isolation)
        key, position, entry = self._next(name, transactions.KIND)
        body = transactions.body(
            self, fn, args, kwargs, position=position, name=name, isolation=level, pool=pool
        )
        try:
            return await self._step(
                key, position, name, entry, body, (), {}, retry, timeout,
                kind=transactions.KIND, record_args=(args, kwargs),
            )  # fmt: skip
        finally:
            self._busy = None

    async def _step(
        self,
        key: str,
        position: int,
        name: str,
        entry: HistoryEntry | None,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        retry: RetryPolicy | None,
        timeout: float | timedelta | None,
        *,
        kind: str = "step",  # the history kind recorded (ctx.transaction: "transaction")
        record_args: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
        rate: str | None = None,  # the step rate limit each attempt starts under
    ) -> Any:
        # The arguments a failure record shows (a transaction's body takes none itself).
        shown_args, shown_kwargs = record_args or (args, kwargs)
        hint = serialization.return_hint(fn)
        policy = retry or self.workflow.retry or self.engine.default_retry
        prior = self.claimed.step_attempt if self.claimed.step_key == key else 0
        if entry is not None:
            output, error = self._opened(entry)  # flowkeeper.codec
            if entry.status == "completed":
                value = serialization.loads(
                    output, hint, entry.output_type, what=f"The result of step {key!r}"
                )
                self._inputs.produced(value, key)
                return value
            if entry.status == "retrying":
                # A parallel branch's step between attempts (migration 0009).
                prior = entry.attempts
                await self._retry_due(key, entry.wake_at)
            else:
                error = error or {}
                raise StepFailedError(
                    key,
                    str(error.get("type", "Error")),
                    str(error.get("message", "")),
                    error.get("traceback"),
                    entry.attempts,
                )

        if self._branches:
            region = self._region
            if region is not None and self._lost_attempts:
                region.lost, self._lost_attempts = self._lost_attempts, 0
            lost = region.lost if region is not None else 0
        else:
            lost, self._lost_attempts = self._lost_attempts, 0
        attempt = prior + lost + 1
        if lost:
            self._charge_lost(key, prior, lost, policy)
            if attempt > policy.max_attempts:
                exc = AttemptLostError(
                    f"Step {key!r} was being executed when its invocation ended (the process "
                    "was killed, ran out of memory, hit its host's time limit or called "
                    f"os._exit), {lost} time(s) in a row; with {attempt - 1} attempt(s) used "
                    f"of the {policy.max_attempts} its retry policy allows, it is not run "
                    "again. Look for what ends the process during this step."
                )
                self._record_failure(
                    key, position, name, attempt - 1, self.db_time(), exc, shown_args,
                    shown_kwargs, attempt_event=False, kind=kind,
                )  # fmt: skip
                await self._flush_if_branch()
                error = error_info(exc, step=key)
                error["traceback"] = None
                raise StepFailedError(key, error["type"], error["message"], None, attempt - 1)

        while True:
            outcome = await self._attempt(
                key, position, name, fn, args, kwargs, policy, timeout, attempt, hint,
                kind, (shown_args, shown_kwargs), rate,
            )  # fmt: skip
            if not isinstance(outcome, _Retry):
                return outcome
            # A branch: wait for the backoff here (other branches go on), or
            # until every branch waits and the run suspends.
            await self._retry_due(key, outcome.due)
            attempt += 1

    async def _retry_due(self, key: str, due: datetime | None) -> None:
        """A step that failed earlier is retried once ``due`` has come."""
        if due is None or self.db_time() >= due:
            return
        if self._branches:
            await self._park(key, "retry", due)
            return
        # Called before its retry was due (a duplicate or early dispatch).
        raise await self._suspend(Outcome.RETRYING, status="retrying", due_at=due)

    async def _flush_if_branch(self) -> None:
        """Inside branches, a step's record is written as soon as it is known."""
        if self._branches:
            await self._flush()

    async def _attempt(
        self,
        key: str,
        position: int,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        policy: RetryPolicy,
        timeout: float | timedelta | None,
        attempt: int,
        hint: Any,
        kind: str,
        shown: tuple[tuple[Any, ...], dict[str, Any]],
        rate: str | None = None,
    ) -> Any:
        """One attempt of a step: its value, or a _Retry when a branch must wait to retry."""
        if rate is not None:
            await self._throttle(key, attempt, rate)
        await self._before_new_work(step_key=key, step_attempt=attempt - 1)
        if self._branches:
            # Let the other branches make their ctx calls (and be refused, if
            # they misuse ctx) before this body starts.
            await asyncio.sleep(0)
        if self._broken is not None:
            raise self._broken
        if self._cancelled:
            raise _Suspend(await self._stopped(None, 0))
        # At most engine.max_parallel_steps bodies run at once in one invocation.
        waited = self._slots.locked()
        await self._slots.acquire()
        if waited and self._branches and time.monotonic() >= self.deadline:
            # The budget ran out while this branch waited for a slot: it starts
            # nothing more (a hand-off park only ends with the run's suspension).
            self._slots.release()
            await self._park(key, "handoff", None)
        try:
            return await self._attempt_body(
                key, position, name, fn, args, kwargs, policy, timeout, attempt, hint, kind, shown
            )
        finally:
            self._slots.release()

    async def _attempt_body(
        self,
        key: str,
        position: int,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        policy: RetryPolicy,
        timeout: float | timedelta | None,
        attempt: int,
        hint: Any,
        kind: str,
        shown: tuple[tuple[Any, ...], dict[str, Any]],
    ) -> Any:
        # The arguments a record shows (a transaction's body takes none itself).
        shown_args, shown_kwargs = shown
        started = self.db_time()
        try:
            value = await self._invoke(key, attempt, fn, args, kwargs, timeout)
            output = serialization.dumps_for_storage(value, what=f"The result of step {key!r}")
            tag = serialization.type_tag(value) if hint is None else None
            if type(value) is str and hint in (None, str):
                restored = value  # immutable, and JSON gives it back unchanged: no parse
            else:
                restored = serialization.loads(
                    output, hint, tag, what=f"The result of step {key!r}"
                )
        except asyncio.CancelledError:
            reason = self._interrupted
            if reason is None or reason == "settle" or self._ended is not None:
                raise  # the host cancelled this invocation, or the workflow ended: let it end
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task.uncancel()
            if reason == "cancelled":
                how = "cancelled its task" if inspect.iscoroutinefunction(fn) else (
                    "waited for its thread to return"
                )  # fmt: skip
                raise _Suspend(await self._stopped(key, attempt, how)) from None
            raise _Suspend(await self._lost()) from None
        except SerializationError as exc:
            # Deterministic: retrying would fail the same way.
            self._executed += 1
            self._record_failure(
                key, position, name, attempt, started, exc, shown_args, shown_kwargs, kind=kind
            )
            await self._flush_if_branch()
            raise StepFailedError(key, "SerializationError", str(exc), None, attempt) from exc
        except Exception as exc:
            self._executed += 1
            if policy.should_retry(attempt, exc):
                delay = policy.next_delay(attempt, exc)
                logger.info(
                    "run %s: step %r attempt %d failed (%s: %s); retrying in %.2fs",
                    self.run_id,
                    key,
                    attempt,
                    type(exc).__name__,
                    clean_text(str(exc)),
                    delay,
                )
                error = error_info(exc, step=key)
                self._pending_events.append(
                    self._attempt_event(key, attempt, started, error, delay)
                )
                if self._branches:
                    due = self.db_time() + timedelta(seconds=delay)
                    self._pending_steps.append(
                        self._retry_record(key, position, name, attempt, started, error, due)
                    )
                    await self._flush()
                    return _Retry(due)
                raise await self._suspend(
                    Outcome.RETRYING,
                    status="retrying",
                    due_in=timedelta(seconds=delay),
                    error=error,
                    step_key=key,
                    step_attempt=attempt,
                ) from None
            self._record_failure(
                key, position, name, attempt, started, exc, shown_args, shown_kwargs, kind=kind
            )
            await self._flush_if_branch()
            error = error_info(exc, step=key)
            raise StepFailedError(
                key, error["type"], error["message"], error["traceback"], attempt
            ) from exc
        self._executed += 1
        if kind != "step":  # ctx.transaction wrote its record in its own transaction
            return restored
        self._pending_steps.append(
            StepRecord(
                key=key,
                position=position,
                name=name,
                kind="step",
                status="completed",
                input=self._input_json(args, kwargs),
                output=output,
                output_type=tag,
                error=None,
                attempts=attempt,
                started_at=started,
                finished_at=self.db_time(),
            )
        )
        self._inputs.produced(restored, key)
        await self._flush_if_branch()
        return restored

    def _retry_record(
        self,
        key: str,
        position: int,
        name: str,
        attempt: int,
        started: datetime,
        error: dict[str, Any],
        due: datetime,
    ) -> StepRecord:
        """A branch step's retry state: attempts so far, last error, next attempt due."""
        return StepRecord(
            key=key,
            position=position,
            name=name,
            kind="step",
            status="retrying",
            input=None,
            output=None,
            output_type=None,
            error=error,
            attempts=attempt,
            started_at=started,
            finished_at=self.db_time(),
            wake_at=due,
        )

    def _opened(self, entry: HistoryEntry) -> tuple[str | None, dict[str, Any] | None]:
        """A recorded step's result and error, opened when sealed (flowkeeper.codec)."""
        sealer = self.store.sealer
        return self.unsealed(
            f"step {entry.key!r}",
            lambda: (sealer.open_json(entry.output), sealer.open_error(entry.error)),
        )

    def unsealed(self, where: str, open_: Callable[[], _T]) -> _T:
        """``open_()``, which opens recorded values; when one cannot be opened (its key
        is gone) the run fails, whatever the workflow does with the exception:
        nothing wrong is replayed."""
        try:
            return open_()
        except DecryptionError as exc:
            self._broken = WorkflowError(f"Run {self.run_id}, {where}: {exc}")
            raise self._broken from exc

    def _charge_lost(self, key: str, prior: int, lost: int, policy: RetryPolicy) -> None:
        """Record each attempt that died with its invocation on the run's history."""
        logger.warning(
            "run %s: step %r: %d attempt(s) ended with their invocation (the process died "
            "during the step); attempt %d of %d is next",
            self.run_id,
            key,
            lost,
            prior + lost + 1,
            policy.max_attempts,
        )
        for attempt in range(prior + 1, prior + lost + 1):
            self._pending_events.append(
                EventRecord(
                    "attempt_lost",
                    step_key=key,
                    attempt=attempt,
                    detail={
                        "error": {
                            "type": "flowkeeper.errors.AttemptLostError",
                            "message": "The invocation ended while this attempt was running "
                            "(process killed, out of memory, host time limit or os._exit); "
                            "its lease expired and the attempt counts as failed.",
                            "traceback": None,
                        }
                    },
                )
            )

    def _record_failure(
        self,
        key: str,
        position: int,
        name: str,
        attempt: int,
        started: datetime,
        exc: BaseException,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        attempt_event: bool = True,
        kind: str = "step",
    ) -> None:
        error = error_info(exc, step=key)
        logger.warning(
            "run %s: step %r failed for good after %d attempt(s): %s: %s",
            self.run_id,
            key,
            attempt,
            error["type"],
            error["message"],
        )
        if attempt_event:
            self._pending_events.append(self._attempt_event(key, attempt, started, error, None))
        self._pending_steps.append(
            StepRecord(
                key=key,
                position=position,
                name=name,
                kind=kind,
                status="failed",
                input=self._input_json(args, kwargs),
                output=None,
                output_type=None,
                error=error,
                attempts=attempt,
                started_at=started,
                finished_at=self.db_time(),
            )
        )

    def _attempt_event(
        self,
        key: str,
        attempt: int,
        started: datetime,
        error: dict[str, Any],
        retry_in: float | None,
    ) -> EventRecord:
        detail: dict[str, Any] = {
            "started_at": started.isoformat(),
            "finished_at": self.db_time().isoformat(),
            "error": error,
        }
        if retry_in is not None:
            detail["retry_in"] = round(retry_in, 3)
        return EventRecord("attempt_failed", step_key=key, attempt=attempt, detail=detail)

    def _input_json(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        return self._inputs.record(args, kwargs)

    async def _invoke(
        self,
        key: str,
        attempt: int,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | timedelta | None,
    ) -> Any:
        seconds = _seconds(timeout) if timeout is not None else None
        task = asyncio.current_task()
        assert task is not None
        self._bodies.add(task)
        marker = _STEP.set((self, key, attempt))
        step_token = stepctx.enter(self.run_id, key, attempt)  # ctx.idempotency_key (stepctx)
        is_async = inspect.iscoroutinefunction(fn)
        observed = self.observed.attempt_started(key, attempt, is_async)  # observe: attempt
        failure: BaseException | None = None
        try:
            if is_async:
                return await self._invoke_async(fn, args, kwargs, seconds)
            result = await self._invoke_sync(
                # In the caller's context, as asyncio.to_thread does: context
                # variables (request ids, tracing spans) reach sync steps too.
                key,
                attempt,
                functools.partial(contextvars.copy_context().run, fn, *args, **kwargs),
                seconds,
            )
            if inspect.isawaitable(result):
                result = await result
            return result
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self.observed.attempt_ended(observed, failure)  # observe: attempt ended
            stepctx.leave(step_token)
            _STEP.reset(marker)
            self._bodies.discard(task)
            self._body_ended.set()

    @staticmethod
    async def _invoke_async(
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        seconds: float | None,
    ) -> Any:
        if seconds is None:
            return await fn(*args, **kwargs)
        try:
            async with asyncio.timeout(seconds) as scope:
                return await fn(*args, **kwargs)
        except TimeoutError:
            if not scope.expired():
                raise  # the step's own TimeoutError, not ours
            # asyncio.timeout cancelled the body and waited for it to end.
            raise StepTimeoutError(f"Step attempt exceeded its timeout of {seconds:g}s") from None

    async def _invoke_sync(
        self, key: str, attempt: int, call: Callable[[], Any], seconds: float | None
    ) -> Any:
        future = self.engine.executor.submit(call)
        wrapped = asyncio.wrap_future(future)
        self._threads.add(wrapped)
        wrapped.add_done_callback(self._threads.discard)
        try:
            done, _ = await asyncio.wait({wrapped}, timeout=seconds)
        except asyncio.CancelledError:
            if self._interrupted is not None:
                # A thread cannot be stopped: wait until it returns, so that no
                # other attempt of this step can start while it still runs.
                await self._wait_thread(wrapped)
            raise
        if done:
            return wrapped.result()
        assert seconds is not None
        raise await self._hung(key, attempt, future, wrapped, seconds)

    async def _hung(
        self,
        key: str,
        attempt: int,
        future: concurrent.futures.Future[Any],
        wrapped: asyncio.Future[Any],
        seconds: float,
    ) -> StepTimeoutError:
        """A sync step overran its timeout: report it now, and wait until its thread ends."""
        if future.cancel():  # it never started: every step thread was busy
            return StepTimeoutError(
                f"Step attempt exceeded its timeout of {seconds:g}s before a thread was free "
                f"to run it (all {self.engine.executor.max_workers} step threads were busy; "
                "see FlowKeeper(max_step_threads=...))"
            )
        self.engine.executor.abandon(future)
        logger.warning(
            "run %s: sync step %r attempt %d overran its timeout of %gs and its thread is "
            "still running (Python cannot interrupt a thread); the run keeps its lease and "
            "the next attempt waits until the thread returns",
            self.run_id,
            key,
            attempt,
            seconds,
        )
        self._pending_events.append(
            EventRecord(
                "step_hung",
                step_key=key,
                attempt=attempt,
                detail={"timeout": seconds, "threads_hung": self.engine.executor.abandoned},
            )
        )
        waited = time.monotonic()
        try:
            await self._report_hung(key, attempt)
        except asyncio.CancelledError:
            # Interrupted (a cancel, a lost lease, a run timeout) while the report
            # was being written: the thread still runs, so wait for it all the
            # same before this body ends and the run may be let go of.
            if self._interrupted is None:
                raise  # the host cancelled us: run() keeps the lease until it returns
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task.uncancel()
            await self._wait_thread(wrapped)
            raise asyncio.CancelledError from None
        await self._wait_thread(wrapped)
        late = time.monotonic() - waited
        return StepTimeoutError(
            f"Step attempt exceeded its timeout of {seconds:g}s; it was a sync function, "
            f"whose thread returned {late:.1f}s later (its result was discarded)"
        )

    async def _report_hung(self, key: str, attempt: int) -> None:
        """Write the step_hung report now, without ever letting go of the run.

        The step's thread is still running: releasing the run here (as a
        refused write otherwise does, when the run was cancelled meanwhile) or
        handing it on would let a replay or another invocation start the step
        again alongside it.  A refused write is left for the write after the
        thread has returned, which then lets go of the run.
        """
        if self._lease_lost or self._cancelled:
            return
        steps, events = self._take_pending()
        await self._write(
            "running",
            new_token=self.token,
            keep_due=True,
            step_key=key,
            step_attempt=attempt - 1,
            steps=steps,
            events=events,
        )

    async def _wait_thread(self, wrapped: asyncio.Future[Any]) -> None:
        """Wait until a step's thread has returned, through our own interruptions."""
        interrupted = False
        while not wrapped.done():
            try:
                await asyncio.wait({wrapped})
            except asyncio.CancelledError:
                if self._interrupted is None:
                    raise
                interrupted = True
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    task.uncancel()
        if interrupted:
            raise asyncio.CancelledError

    # waits, events and tokens (flowkeeper.waits) -----------------------------------------
    async def _register_cancel_rules(self, run_input: Any) -> None:
        """The workflow's cancel_on rules, registered before its first operation.

        Idempotent: an invocation that died before the run recorded anything
        registers them again, and each looks back to the run's creation, so an
        event sent between the trigger and now still cancels it.
        """
        since = self.claimed.created_at or self.db_time()
        for index, rule in enumerate(self.workflow.cancel_on):
            try:
                match = rule.resolve(run_input)
            except StepUsageError as exc:
                self._broken = exc
                raise
            try:
                outcome = await self.store.register_cancel_rule(
                    self.run_id,
                    self.token,
                    key=f"cancel_on#{index}",
                    event=rule.event,
                    paths=match.paths,
                    values=match.values,
                    match=match.given,
                    containment=match.containment,
                    since=since,
                )
            except DatabaseError as exc:
                raise _Abort(exc) from exc
            if outcome == "lost":
                raise _Suspend(await self._lost())
            if outcome == "cancelled":
                logger.info("run %s: cancelled by an event sent before it started", self.run_id)
                raise _Suspend(await self._lost())

    def _segment(self, outcome: Outcome, *, due_at: datetime | None = None) -> SegmentResult:
        self._pending_steps, self._pending_events = [], []
        self._ended = SegmentResult(self.run_id, outcome, self._executed, due_at=due_at)
        return self._ended

    def _database_failure(self, exc: BaseException) -> BaseException:
        """What a store call that failed inside an operation raises in the workflow."""
        if isinstance(exc, DatabaseError):
            return _Abort(exc)
        return exc

    async def wait(self, name: str, spec: WaitSpec) -> Any:
        from . import waits

        self.observed.note("wait", name, kind=spec.kind, event=spec.event)  # observe: wait
        try:
            return await waits.wait(self, name, spec)
        except DatabaseRefusedError as exc:
            raise await self._refused(exc) from exc

    async def send_event(self, event: str, data: Any, event_id: str | None) -> Any:
        """ctx.send_event: a step that sends once (its dedup id is the run and step key)."""
        bus = self.engine.events
        if bus is None:  # pragma: no cover - FlowKeeper always sets it
            raise StepUsageError("ctx.send_event needs the FlowKeeper's event bus")
        # Checked before anything is recorded: a bad event is the workflow's bug.
        try:
            check_event_name(event)
            serialization.dumps(data, what=f"The data of event {event!r}")
        except (ValueError, SerializationError) as exc:
            raise StepUsageError(f"ctx.send_event({event!r}, ...): {exc}") from None
        name = f"send:{event}"
        key, position, entry = self._next(name, "step")
        dedup = event_id or f"run:{self.run_id}:{key}"
        run_id = self.run_id

        async def send() -> dict[str, Any]:
            sent = await bus.send(event, data, id=dedup, run_id=run_id)
            return {
                "event_id": sent.id,
                "duplicate": sent.duplicate,
                "woken": len(sent.woken),
                "started": len(sent.started),
                "cancelled": len(sent.cancelled),
            }

        try:
            return await self._step(key, position, name, entry, send, (), {}, None, None)
        finally:
            self._busy = None

    async def create_token(self, name: str, timeout: timedelta | None) -> Token:
        """ctx.create_token: a step that makes an approval token (see flowkeeper.tokens)."""
        signer = self.engine.tokens
        if signer is None:  # pragma: no cover - FlowKeeper always sets it
            raise StepUsageError("ctx.create_token needs the FlowKeeper's token signer")
        step_name = f"token:{name}"
        key, position, entry = self._next(step_name, "step")
        run_id = self.run_id
        store = self.store
        expires = self.db_time() + timeout if timeout is not None else None

        async def create() -> Token:
            raw, signed = signer.new()
            await store.create_token(raw, run_id, name, expires)
            return Token(id=signed, name=name, url=signer.url(signed), expires_at=expires)

        try:
            value = await self._step(key, position, step_name, entry, create, (), {}, None, None)
        finally:
            self._busy = None
        # The step's return annotation (Token) restores it on replay as well.
        assert isinstance(value, Token)
        return value

    # child runs (flowkeeper.children) -------------------------------------------------
    async def start_child(
        self,
        name: str,
        workflow: Any,
        input: Any,
        *,
        cancel_with_parent: bool,
        max_concurrency: int | None,
    ) -> ChildHandle:
        from . import children

        return await children.start_child(
            self,
            name,
            workflow,
            input,
            cancel_with_parent=cancel_with_parent,
            max_concurrency=max_concurrency,
        )

    async def wait_for_children(
        self,
        handles: list[ChildHandle],
        *,
        name: str,
        timeout: timedelta | float | None,
        return_exceptions: bool,
    ) -> list[Any]:
        from . import children

        return await children.wait_for_children(
            self, handles, name=name, timeout=timeout, return_exceptions=return_exceptions
        )

    # versioning (flowkeeper.patches) ------------------------------------------
    def patched(self, patch_id: str) -> bool:
        return patches.patched(self, patch_id)

    def deprecate_patch(self, patch_id: str) -> None:
        patches.deprecate_patch(self, patch_id)

    # sleeps --------------------------------------------------------------
    async def sleep(
        self, name: str, *, duration: timedelta | float | None, until: datetime | None
    ) -> None:
        key, position, entry = self._next(name, "sleep")
        try:
            await self._sleep(key, position, name, entry, duration=duration, until=until)
        finally:
            self._busy = None

    async def _sleep(
        self,
        key: str,
        position: int,
        name: str,
        entry: HistoryEntry | None,
        *,
        duration: timedelta | float | None,
        until: datetime | None,
    ) -> None:
        if entry is not None:
            if entry.wake_at is None or self.db_time() >= entry.wake_at:
                return
            if self._branches:
                await self._park(key, "sleep", entry.wake_at)
                return
            # Invoked before the wake time (a duplicate or early dispatch).
            raise await self._suspend(Outcome.SLEEPING, status="sleeping", due_at=entry.wake_at)

        self._lost_attempts = 0  # an invocation that died here was not inside a step
        if until is not None:
            if until.tzinfo is None:
                self._broken = StepUsageError(
                    f"ctx.sleep_until({name!r}, ...) needs a timezone-aware datetime, e.g. "
                    "datetime.now(timezone.utc) + timedelta(hours=1)."
                )
                raise self._broken
            seconds = (until - self.db_time()).total_seconds()
        else:
            assert duration is not None
            seconds = _seconds(duration)
            if seconds != seconds or seconds == float("inf"):
                self._broken = StepUsageError(
                    f"ctx.sleep({name!r}, ...) needs a finite duration, got {duration!r}."
                )
                raise self._broken
        started = self.db_time()
        if self._lease_lost:
            raise _Suspend(await self._lost())
        if self._cancelled:
            raise _Suspend(await self._stopped(None, 0))
        self.observed.note("sleep", key, seconds=seconds)  # observe: sleep recorded
        if seconds <= 0:
            self._pending_steps.append(self._sleep_record(key, position, name, started, started))
            return
        if self._branches:
            # A sleep inside a branch: its wake time is recorded at once; the
            # branch parks until then (the others go on), or the run sleeps
            # once every branch waits.
            wake = until or started + timedelta(seconds=seconds)
            self._pending_steps.append(self._sleep_record(key, position, name, started, wake))
            await self._flush()
            await self._park(key, "sleep", wake)
            return
        record = self._sleep_record(key, position, name, started, until)
        if until is not None:
            raise await self._suspend(
                Outcome.SLEEPING, status="sleeping", due_at=until, extra_steps=[record]
            )
        raise await self._suspend(
            Outcome.SLEEPING,
            status="sleeping",
            due_in=timedelta(seconds=seconds),
            extra_steps=[record],
        )

    @staticmethod
    def _sleep_record(
        key: str, position: int, name: str, started: datetime, wake_at: datetime | None
    ) -> StepRecord:
        # wake_at None: the commit fills in the run's due_at (now + duration, DB clock).
        return StepRecord(
            key=key,
            position=position,
            name=name,
            kind="sleep",
            status="sleeping",
            input=None,
            output=None,
            output_type=None,
            error=None,
            attempts=1,
            started_at=started,
            finished_at=None,
            wake_at=wake_at,
        )
