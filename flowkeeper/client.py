"""``FlowKeeper``: the object an application creates once and uses everywhere."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from . import foreign, stepinputs
from .alerts import AlertSender
from .codec import Codec
from .db import Database, describe
from .dispatch import Dispatcher
from .engine import ClaimRefused, Engine, Outcome, SegmentResult
from .errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseRefusedError,
    RunCancelledError,
    RunFailedError,
    RunNotFoundError,
    RunTimeoutError,
    UnknownWorkflowError,
)
from .eventops import EventOperations
from .events import CancelOn, EventBus
from .executor import StepExecutor
from .flowcontrol import (
    Concurrency,
    Debounce,
    FlowKeys,
    RateLimit,
    check_priority,
    merge_debounced,
)
from .gcpolicy import DEFAULT_GEN0, check_gc_threshold
from .ids import check_idempotency_key, check_run_id, new_run_id
from .models import (
    AttemptError,
    RunEvent,
    RunHandle,
    RunInfo,
    RunStatus,
    StepInfo,
    TickResult,
)
from .obsops import ObservabilityOperations
from .operations import RunOperations
from .outbox import transaction_ended
from .retention import Pruner, Retention, check_retention
from .retry import DEFAULT_RETRY, RetryPolicy
from .scheduler import Scheduler
from .schedules import Schedules
from .serialization import json_or_none
from .signing import KeyInput, RequestSigner, check_dashboard_password, check_signing_keys
from .sql import validate_schema
from .steprates import StepRates, check_step_rates
from .store import ClaimedRun, Store
from .streamops import StreamOperations
from .streams import StreamTokens
from .tokens import TokenSigner
from .workflow import FailureHook, Registry, Workflow, WorkflowFunction, define_workflow

if TYPE_CHECKING:
    import asyncpg
    from starlette.applications import Starlette

    from .sync import SyncFlowKeeper

# A child's segment that ends it: its parent may have become due.
_ENDED = (Outcome.COMPLETED, Outcome.FAILED, Outcome.CANCELLED)

logger = logging.getLogger("flowkeeper")


def _run_fields(wf: Workflow, flow: Any, priority: int) -> dict[str, Any]:
    """What a new run of ``wf`` records besides its input: code version and flow control."""
    return {
        "code_version": wf.version,
        "flow_keys": flow.keys,
        "flow_limits": flow.limits,
        "priority": priority,
        "timeout": wf.timeout,
        "start_timeout": wf.start_timeout,
        "rate_keys": flow.rate_keys,
        "rate_spacing": flow.rate_spacing,
    }


F = TypeVar("F", bound=WorkflowFunction)


def _duration(value: float | timedelta, name: str) -> timedelta:
    delta = value if isinstance(value, timedelta) else timedelta(seconds=float(value))
    if delta.total_seconds() <= 0:
        raise ConfigurationError(f"{name} must be positive, got {value!r}")
    return delta


def _positive_int(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{name} must be a positive whole number, got {value!r}")
    return value


def _grace(value: object) -> timedelta:
    """``unknown_workflow_grace``: a timedelta or seconds, finite, zero (fail at once) or more."""
    name = "unknown_workflow_grace"
    if isinstance(value, timedelta):
        delta = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigurationError(f"{name} must be a finite duration, got {value!r}")
        try:
            delta = timedelta(seconds=value)
        except OverflowError:
            raise ConfigurationError(f"{name} is too long: {value!r} seconds") from None
    else:
        raise ConfigurationError(
            f"{name} must be a timedelta or a number of seconds, e.g. timedelta(days=1); "
            f"got {value!r}"
        )
    if delta < timedelta(0):
        raise ConfigurationError(f"{name} must not be negative (0 fails such runs at once)")
    return delta


def _env_keys() -> list[str] | None:
    raw = os.environ.get("FLOWKEEPER_SIGNING_KEY")
    if not raw:
        return None
    return [k.strip() for k in raw.split(",") if k.strip()]


class FlowKeeper(RunOperations, EventOperations, StreamOperations, ObservabilityOperations):
    """Durable workflows on Postgres, executed through a signed endpoint.

    ``database_url``, ``signing_key`` and ``endpoint`` default to the
    environment variables ``DATABASE_URL`` (or ``FLOWKEEPER_DATABASE_URL``),
    ``FLOWKEEPER_SIGNING_KEY`` (comma-separated to rotate keys: the first
    signs, all verify) and ``FLOWKEEPER_ENDPOINT``.  Constructing one does no
    I/O: the pool is made, and the schema checked, on first use.

    ``endpoint`` is the public URL where ``fk.asgi()`` is mounted.  Without it
    this process can still trigger runs (they are left due for the scheduler)
    and serve invocations, but cannot push them.

    Sync step functions run in threads of flowkeeper's own, at most
    ``max_step_threads`` at once per process (see :mod:`flowkeeper.executor`).
    ``max_parallel_steps`` (16) bounds how many step bodies of one run execute
    at once in one invocation (branches of ``asyncio.gather`` / ``ctx.map``).

    ``rate_limits`` names limits that single steps take their start times
    from (``{"openai": RateLimit(limit=10, period=timedelta(seconds=1))}``,
    used as ``ctx.step(..., rate_limit="openai")``; see :mod:`flowkeeper.steprates`).

    ``unknown_workflow_grace`` (a day by default): an invocation of a run whose
    workflow this process does not know (an instance still on older code during
    a rolling deploy) defers the run instead of failing it; it fails only once
    endpoints have not known its workflow for this long (see flowkeeper.deploys).

    ``group_commit`` (on by default): when several runs of this process write
    at the same moment, their writes share one Postgres transaction (see
    :mod:`flowkeeper.groupcommit`); a lone write goes at once, as without it.

    Observability (see README "Observability"): log records emitted inside a
    run are kept with it (``step_logs``, ``step_log_level``, ``step_log_bytes``
    per step, ``run_log_bytes`` per run, ``capture_print`` for ``print()``);
    with the ``otel`` extra installed and a tracer provider configured, each
    invocation and step attempt is a span (``tracing=False`` turns it off), and
    the engine records OpenTelemetry metrics (``metrics=False`` turns them
    off); ``metrics_token`` (or ``FLOWKEEPER_METRICS_TOKEN``) serves the
    database gauges as Prometheus text at ``GET <endpoint>/metrics``.  An async
    step that blocks the event loop for over ``stall_threshold`` seconds is
    reported (a WARNING and a ``loop_stall`` event on the run).

    ``gc_threshold`` (20,000): the serving app (``asgi()``, ``wsgi()``) raises
    the cyclic garbage collector's first threshold to it, from CPython's 700,
    unless the process set a higher one or turned collection off; collections
    took about 18 % of the endpoint's CPU under load (see
    :mod:`flowkeeper.gcpolicy`).  ``None`` leaves the collector alone.

    Weak secrets are refused with a :class:`ConfigurationError`: every signing
    key needs at least 32 characters, a dashboard password at least 12 (and
    more than whitespace).  ``allow_weak_secrets=True`` turns the check off,
    for tests only.
    """

    def __init__(
        self,
        database_url: str | None = None,
        signing_key: KeyInput | None = None,
        endpoint: str | None = None,
        schema: str = "flowkeeper",
        *,
        pool_size: int = 5,
        pooled: bool | None = None,
        time_budget: float | timedelta = 60.0,
        lease: float | timedelta = 30.0,
        dispatch_lease: float | timedelta = 30.0,
        default_retry: RetryPolicy | None = None,
        max_body_bytes: int = 64 * 1024,
        cron_secret: str | None = None,
        auto_migrate: bool = True,
        record_step_inputs: bool = True,
        group_commit: bool = True,
        ack_timeout: float = 10.0,
        dashboard_password: str | None = None,
        dashboard_path: str | None = "/ui",
        dashboard_session_ttl: float | timedelta = timedelta(hours=12),
        alert_webhook: str | None = None,
        max_step_threads: int = 32,
        max_parallel_steps: int = 16,
        max_children: int = 100,
        unknown_workflow_grace: float | timedelta = timedelta(days=1),
        event_retention: float | timedelta = timedelta(days=7),
        retention: Retention | None = None,
        rate_limits: Mapping[str, RateLimit] | None = None,
        allow_weak_secrets: bool = False,
        codec: Codec | None = None,
        step_logs: bool = True,
        step_log_level: int | str = logging.INFO,
        step_log_bytes: int = 64 * 1024,
        run_log_bytes: int = 1024 * 1024,
        capture_print: bool = False,
        tracing: object = None,
        metrics: object = None,
        metrics_token: str | None = None,
        stall_threshold: float | None = 0.5,
        gc_threshold: int | None = DEFAULT_GEN0,
    ) -> None:
        # What a twin of this object on another event loop is built from (fk.sync).
        settings = {k: v for k, v in locals().items() if k != "self"}
        url = (
            database_url
            or os.environ.get("FLOWKEEPER_DATABASE_URL")
            or os.environ.get("DATABASE_URL")
        )
        if not url:
            raise ConfigurationError(
                "No database configured: pass database_url=... or set DATABASE_URL "
                "(e.g. postgresql://user:password@localhost:5432/app)."
            )
        keys = signing_key if signing_key is not None else _env_keys()
        if keys is None:
            raise ConfigurationError(
                "No signing key configured: pass signing_key=... or set FLOWKEEPER_SIGNING_KEY "
                "to a long random secret shared by everything that dispatches or serves runs "
                '(python -c "import secrets; print(secrets.token_urlsafe(32))").'
            )
        endpoint = endpoint if endpoint is not None else os.environ.get("FLOWKEEPER_ENDPOINT")
        self.schema = validate_schema(schema)
        settings.update(database_url=url, signing_key=keys, endpoint=endpoint or "")
        self._settings = settings
        self._sync: SyncFlowKeeper | None = None
        check_signing_keys(keys, allow_weak=allow_weak_secrets)
        self.signer = RequestSigner(keys)
        self.time_budget = _duration(time_budget, "time_budget")
        # Applied by the serving app (fk.asgi(), fk.wsgi()); see flowkeeper.gcpolicy.
        self.gc_threshold = check_gc_threshold(gc_threshold)
        self.lease = _duration(lease, "lease")
        self.dispatch_lease = _duration(dispatch_lease, "dispatch_lease")
        #: How long a run may go on reaching endpoints that do not know its
        #: workflow (a rolling deploy) before it fails; see flowkeeper.deploys.
        self.unknown_workflow_grace = _grace(unknown_workflow_grace)
        if max_body_bytes < 1024:
            raise ConfigurationError("max_body_bytes must be at least 1024")
        self.max_body_bytes = max_body_bytes
        self.cron_secret = cron_secret or os.environ.get("CRON_SECRET") or None
        self.registry = Registry()
        self.db = Database(url, max_size=pool_size, pooled=pooled)
        # Payloads sealed at rest when a codec is given (flowkeeper.codec).
        self.store = Store(
            self.db,
            self.schema,
            auto_migrate=auto_migrate,
            group_commit=group_commit,
            codec=codec,
        )
        self.engine = Engine(
            self.store,
            self.registry,
            lease=self.lease,
            dispatch_lease=self.dispatch_lease,
            default_retry=default_retry or DEFAULT_RETRY,
            record_step_inputs=record_step_inputs,
            executor=StepExecutor(_positive_int(max_step_threads, "max_step_threads")),
            unknown_workflow_grace=self.unknown_workflow_grace,
            max_parallel_steps=_positive_int(max_parallel_steps, "max_parallel_steps"),
            max_children=_positive_int(max_children, "max_children"),
            step_rates=StepRates(self.store, check_step_rates(rate_limits)),
        )
        self.dispatcher = (
            Dispatcher(endpoint, self.signer, ack_timeout=ack_timeout) if endpoint else None
        )
        self._background: set[asyncio.Task[Any]] = set()
        # Events, waits and approval tokens (flowkeeper.events, flowkeeper.tokens).
        self.event_retention = _duration(event_retention, "event_retention")
        self.events = EventBus(
            self.store,
            self.registry,
            push=self._push if self.dispatcher is not None else None,
            push_lease=self.dispatch_lease,
            schedule=self._spawn,
        )
        self.tokens = TokenSigner(keys, self.dispatcher.endpoint if self.dispatcher else None)
        self.engine.events = self.events
        self.engine.tokens = self.tokens
        if self.dispatcher is not None:
            self.engine.push = self._push_soon
        self._setup_observability(
            step_logs=step_logs,
            step_log_level=step_log_level,
            step_log_bytes=step_log_bytes,
            run_log_bytes=run_log_bytes,
            capture_print=capture_print,
            tracing=tracing,
            metrics=metrics,
            metrics_token=metrics_token,
            allow_weak=allow_weak_secrets,
            stall_threshold=stall_threshold,
        )
        self.events.trace_carrier = self._trace_carrier
        self.stream_tokens = StreamTokens(keys)
        self._scheduler: Scheduler | None = None  # the one fk.tick uses (it prunes events)
        #: Cron schedules: list, pause, resume, run_now (flowkeeper.schedules).
        self.schedules = Schedules(self.store, self.registry)
        #: Retention of finished runs, pruned by every tick (flowkeeper.retention).
        self.retention = check_retention(retention, "FlowKeeper")
        self.pruner = Pruner(self.store, self.registry, self.retention)
        self._deployed = False
        # Dashboard and failure alerts (flowkeeper.dashboard, flowkeeper.alerts).
        self.dashboard_password = (
            dashboard_password
            if dashboard_password is not None
            else os.environ.get("FLOWKEEPER_DASHBOARD_PASSWORD")
        ) or None
        if self.dashboard_password is not None:
            check_dashboard_password(self.dashboard_password, allow_weak=allow_weak_secrets)
        self.dashboard_path = _dashboard_path(dashboard_path)
        self.dashboard_session_ttl = _duration(dashboard_session_ttl, "dashboard_session_ttl")
        run_url = None
        if self.dispatcher is not None and self.dashboard_path and self.dashboard_password:
            run_url = self.dispatcher.endpoint + self.dashboard_path + "/runs/{run_id}"
        self.alerts = AlertSender(
            self.store,
            self.registry,
            self.signer,
            webhook=alert_webhook or os.environ.get("FLOWKEEPER_ALERT_WEBHOOK") or None,
            run_url=run_url,
        )

    @property
    def sync(self) -> SyncFlowKeeper:
        """Blocking calls for sync code (Django, Flask, scripts), safe from any thread:
        ``fk.sync.trigger(...)``, ``get_run``, ``cancel``, ``result``, ``send_event``
        (see :mod:`flowkeeper.sync`)."""
        if self._sync is None:
            from .sync import SyncFlowKeeper

            self._sync = SyncFlowKeeper(self)
        return self._sync

    def _copy_for_another_loop(self) -> FlowKeeper:
        """A FlowKeeper with this one's settings (its own pool and client), workflows apart."""
        return FlowKeeper(**self._settings)

    # registration ---------------------------------------------------------------
    def register(self, wf: Workflow) -> Workflow:
        """Register a workflow made with :func:`define_workflow`."""
        return self.registry.add(wf)

    def workflow(
        self,
        name: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        on_failure: FailureHook | None = None,
        on_event: str | None = None,
        cancel_on: Sequence[CancelOn] = (),
        version: str | Callable[[Any], str] | None = None,
        concurrency: Concurrency | Sequence[Concurrency] | None = None,
        rate_limit: RateLimit | Sequence[RateLimit] | None = None,
        debounce: Debounce | None = None,
        priority: int = 0,
        cron: str | None = None,
        timezone: str | None = None,
        catch_up: str | None = None,
        timeout: float | timedelta | None = None,
        start_timeout: float | timedelta | None = None,
        retention: Retention | None = None,
    ) -> Callable[[F], F]:
        """Decorator: ``@fk.workflow("checkout")`` defines and registers a workflow.

        ``on_failure`` is called with a :class:`FailureAlert` when a run fails
        for good; ``on_event="user.signup"`` starts a run per such event;
        ``cancel_on=[CancelOn(...)]`` cancels live runs when a matching event
        arrives; ``concurrency=Concurrency(limit=5, key=...)`` caps the runs
        executing at once per key; ``priority`` is its runs' default priority
        (see :mod:`flowkeeper.flowcontrol`); ``cron="0 9 * * MON-FRI"`` with
        ``timezone="Europe/Berlin"`` starts one run per slot (see
        :mod:`flowkeeper.schedules`); ``timeout=timedelta(hours=1)`` and
        ``start_timeout=...`` fail a run past that deadline with
        :class:`RunTimeoutError` (see :func:`define_workflow`).
        """

        def decorator(fn: F) -> F:
            self.register(
                define_workflow(
                    name or fn.__name__,
                    fn,
                    retry=retry,
                    on_failure=on_failure,
                    on_event=on_event,
                    cancel_on=cancel_on,
                    version=version,
                    concurrency=concurrency,
                    rate_limit=rate_limit,
                    debounce=debounce,
                    priority=priority,
                    cron=cron,
                    timezone=timezone,
                    catch_up=catch_up,
                    timeout=timeout,
                    start_timeout=start_timeout,
                    retention=retention,
                )
            )
            return fn

        return decorator

    def _workflow(self, workflow: str | Workflow | Callable[..., Any]) -> Workflow:
        if isinstance(workflow, Workflow):
            return self.registry.add(workflow)
        if isinstance(workflow, str):
            return self.registry.get(workflow)
        for wf in self.registry:
            if wf.fn is workflow:
                return wf
        raise UnknownWorkflowError(
            getattr(workflow, "__name__", repr(workflow)), self.registry.names()
        )

    # triggering -----------------------------------------------------------------
    async def trigger(
        self,
        workflow: str | Workflow | Callable[..., Any],
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        connection: asyncpg.Connection | None = None,
        priority: int | None = None,
    ) -> RunHandle:
        """Start a run of ``workflow`` with ``input``; return its handle once it is stored.

        The input is validated against the workflow's annotation first (a bad
        one raises :class:`InvalidInputError` and creates nothing).  The run is
        handed to the endpoint, which stores and starts it in one write; if
        the endpoint cannot be reached, the run is inserted here, due for the
        scheduler.  A second trigger with the same ``idempotency_key`` returns
        the first run (``handle.created`` is False).  With ``connection=`` (an
        asyncpg connection, a SQLAlchemy ``AsyncConnection``/``AsyncSession``
        on asyncpg, or a psycopg 3 async connection) the run is inserted in that
        connection's transaction and exists only if it commits; on asyncpg it is
        pushed once the transaction ends, on psycopg the scheduler starts it
        (see :mod:`flowkeeper.foreign`).  ``priority`` (0..1000, the workflow's
        default when omitted) gives the run that many minutes of head start in
        the due order (see :mod:`flowkeeper.flowcontrol`).
        """
        wf = self._workflow(workflow)
        input_json = wf.dump_input(input)
        idempotency_key = check_idempotency_key(idempotency_key, wf.name)
        prio = wf.priority if priority is None else check_priority(priority, "trigger()")
        flow = wf.flow(input_json)  # a concurrency key function that fails creates nothing
        run_id = new_run_id()
        await self._check_own_database()
        trace = self._trace_carrier()  # the caller's trace context (flowkeeper.tracing)
        if wf.debounce is not None:
            return await self._debounce(wf, input_json, flow, prio, idempotency_key, connection)
        if (
            prio == wf.priority
            and connection is None
            and self.dispatcher is not None
            and self.dispatcher.supports_create
            and len(input_json) <= self.max_body_bytes - 1024
        ):
            # Hand the run to the endpoint, which creates and claims it in one
            # write and starts it: one commit and one round trip fewer than
            # inserting here and then pushing.
            # (``trace=`` only when there is one: dispatchers of older signature still work.)
            extra = {"trace": trace} if trace else {}
            delivery = await self.dispatcher.create(
                run_id, wf.name, input_json, idempotency_key, **extra
            )
            if delivery.delivered and delivery.body is not None:
                existing = str(delivery.body["run_id"])
                created = bool(delivery.body.get("created", existing == run_id))
                if not created:
                    await self._idempotency_hit(existing, wf.name, idempotency_key, input_json)
                return RunHandle(run_id=existing, workflow=wf.name, created=created, _fk=self)
            logger.warning(
                "could not hand run %s to %s (%s); inserting it here, due for the scheduler",
                run_id,
                self.dispatcher.endpoint,
                delivery.reason,
            )
            # No answer: insert it ourselves.  Should the endpoint have created
            # it after all, the insert conflicts on the run id and changes nothing.
            run_id, created = await self.store.insert_run(
                run_id=run_id,
                workflow=wf.name,
                input_json=input_json,
                idempotency_key=idempotency_key,
                lease_token=None,
                lease=timedelta(0),
                # The endpoint would have applied the workflow's flow control: so do we.
                **_run_fields(wf, flow, prio),
            )
            if not created:
                await self._idempotency_hit(run_id, wf.name, idempotency_key, input_json)
            if created and trace:
                await self._keep_trace(run_id, trace, None)
            return RunHandle(run_id=run_id, workflow=wf.name, created=created, _fk=self)
        if connection is not None:  # SQLAlchemy, psycopg: see flowkeeper.foreign
            connection = await foreign.unwrap(connection)
            if foreign.kind(connection) != "asyncpg":
                return await self._trigger_foreign(
                    connection, wf, run_id, input_json, idempotency_key, prio
                )
        in_transaction = connection is not None and connection.is_in_transaction()
        push_now = self.dispatcher is not None and not in_transaction
        token = uuid.uuid4() if push_now else None
        run_id, created = await self.store.insert_run(
            run_id=run_id,
            workflow=wf.name,
            input_json=input_json,
            idempotency_key=idempotency_key,
            lease_token=token,
            lease=self.dispatch_lease if push_now else timedelta(0),
            conn=connection,
            **_run_fields(wf, flow, prio),
        )
        handle = RunHandle(run_id=run_id, workflow=wf.name, created=created, _fk=self)
        if created and trace:
            await self._keep_trace(run_id, trace, connection)
        if not created:
            logger.debug("trigger %s: idempotency key hit, run %s", wf.name, run_id)
            await self._idempotency_hit(
                run_id, wf.name, idempotency_key, input_json, conn=connection
            )
            return handle
        if push_now and token is not None:
            await self._push(run_id, token)
        elif in_transaction and self.dispatcher is not None and connection is not None:
            self._spawn(self._push_after_commit(connection, run_id))
        return handle

    def _push_soon(self, run_id: str, token: uuid.UUID) -> None:
        """Push a run in the background (a child started by ctx.start_child)."""
        self._spawn(self._push(run_id, token))

    async def _wake_parent(self, child_id: str) -> None:
        """The child's end made its parent due: push the parent now, not at the next tick."""
        if self.dispatcher is None:
            return
        token = uuid.uuid4()
        try:
            parent = await self.store.wake_parent(child_id, token, self.dispatch_lease)
        except (DatabaseError, DatabaseRefusedError) as exc:
            logger.warning("run %s: could not wake its parent (%s); it is due", child_id, exc)
            return
        if parent is not None:
            await self._push(parent, token)

    async def _trigger_foreign(
        self, connection: Any, wf: Workflow, run_id: str, input_json: str, key: str | None,
        priority: int,
    ) -> RunHandle:  # fmt: skip
        """Insert a run on a psycopg async connection; the scheduler starts it after commit."""
        if foreign.kind(connection) != "psycopg_async":
            raise ConfigurationError(
                f"{type(connection).__name__} is a sync connection: trigger with "
                "fk.sync.trigger(..., connection=conn) from sync code."
            )
        await self.store.ensure_schema()
        run_id, created = await foreign.insert_run_psycopg_async(
            self.store.q, connection, self._foreign_insert(wf, run_id, input_json, key, priority)
        )
        return RunHandle(run_id=run_id, workflow=wf.name, created=created, _fk=self)

    def _foreign_insert(
        self, wf: Workflow, run_id: str, input_json: str, key: str | None, priority: int
    ) -> tuple[Any, ...]:
        """insert_run's arguments for another driver's connection: never leased."""
        return self.store.insert_args(
            run_id=run_id,
            workflow=wf.name,
            input_json=input_json,
            idempotency_key=key,
            lease_token=None,
            lease=timedelta(0),
            **_run_fields(wf, wf.flow(input_json), priority),
        )

    async def _idempotency_hit(
        self,
        run_id: str,
        workflow: str,
        key: str | None,
        input_json: str,
        *,
        conn: asyncpg.Connection | None = None,
    ) -> None:
        """A trigger hit an existing run: say so if it came with another input.

        The documented behaviour: the first run stands (``created=False``), its
        input unchanged; a different input is almost always a bug in the
        caller's choice of key, so it is logged as a warning, once per trigger.
        """
        if key is None:
            return  # the same run id handed over twice: the same input
        stored = await self.store.run_input_text(run_id, conn=conn)
        if stored is not None and stored != input_json:
            logger.warning(
                "idempotency key %r of workflow %r was used by run %s with a different input; "
                "returning that run (created=False) with its original input. Use a key that "
                "names the input (an order id, a webhook event id) to trigger new work.",
                key,
                workflow,
                run_id,
            )

    async def _check_own_database(self) -> None:
        """Once per process, at the first trigger: this process's own database works.

        The endpoint creates the runs handed to it, so a wrong DATABASE_URL here
        would go unnoticed until get_run() or result() fail, or until the
        endpoint is down and the fallback insert fails.  After the first success
        this costs nothing (the schema check is cached).
        """
        try:
            await self.store.ensure_schema()
        except DatabaseError as exc:
            raise DatabaseError(
                f"This process cannot use its own database ({describe(self.db.url)}): {exc} "
                "-- trigger() needs it to read runs back and to store them when the endpoint "
                "cannot be reached; check DATABASE_URL (or database_url=) in this process."
            ) from exc

    async def _debounce(
        self,
        wf: Workflow,
        input_json: str,
        flow: FlowKeys,
        priority: int,
        idempotency_key: str | None,
        connection: asyncpg.Connection | None,
    ) -> RunHandle:
        """A trigger of a debounced workflow: merge into the key's pending run (see Debounce)."""
        assert wf.debounce is not None
        if idempotency_key is not None:
            raise ConfigurationError(
                f"Workflow {wf.name!r} is debounced: triggers of one key merge into its pending "
                "run (a retried trigger too), so idempotency_key does not apply; leave it out."
            )
        key = wf.debounce.key_for(wf.name, wf.load_input(input_json))
        run_id, created = await merge_debounced(
            self.store, wf, input_json, key, flow, priority, connection
        )
        return RunHandle(run_id=run_id, workflow=wf.name, created=created, _fk=self)

    async def _push(self, run_id: str, token: uuid.UUID) -> None:
        assert self.dispatcher is not None
        delivery = await self.dispatcher.invoke(run_id, str(token))
        if not delivery.delivered:
            logger.warning(
                "could not push run %s to %s (%s); it is due for the scheduler",
                run_id,
                self.dispatcher.endpoint,
                delivery.reason,
            )
            await self.store.release_push(run_id, token)

    async def _push_after_commit(self, connection: asyncpg.Connection, run_id: str) -> None:
        """Push an outbox-triggered run once the caller's transaction is over."""
        assert self.dispatcher is not None
        if not await transaction_ended(connection):
            return  # still due: the scheduler will pick it up
        # Rolled back: the endpoint answers 404 for the unknown run, which is fine.
        delivery = await self.dispatcher.invoke(run_id, None)
        if not delivery.delivered:
            logger.warning("could not push run %s (%s); it is due", run_id, delivery.reason)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # executing ------------------------------------------------------------------
    async def advance(
        self,
        run_id: str,
        lease: str | None = None,
        *,
        time_budget: float | timedelta | None = None,
    ) -> SegmentResult | ClaimRefused:
        """Claim ``run_id`` and execute it while the budget lasts (what the endpoint does).

        Used directly by hosts that invoke without HTTP (a Lambda direct
        invocation).  Hands the run on when the budget runs out.
        """
        token = uuid.UUID(lease) if lease else None
        claimed = await self.engine.claim(run_id, token)
        if isinstance(claimed, ClaimRefused):
            return claimed
        return await self.execute_claimed(claimed, time_budget=time_budget)

    async def execute_claimed(
        self, claimed: ClaimedRun, *, time_budget: float | timedelta | None = None
    ) -> SegmentResult:
        """Execute a run claimed with ``engine.claim`` and push its continuation if any."""
        budget = self.time_budget
        if time_budget is not None:
            budget = min(budget, _duration(time_budget, "time_budget"))
        deadline = time.monotonic() + budget.total_seconds()
        result = await self.engine.execute(claimed, deadline=deadline)
        if result.outcome is Outcome.FAILED:  # failure alerts: delivered right after the commit
            await self.alerts.after_failure(result.run_id)
        if claimed.parent_id is not None and result.outcome in _ENDED:
            await self._wake_parent(result.run_id)
        if result.handoff_token is not None and result.outcome == "handoff":
            if self.dispatcher is not None:
                await self._push(result.run_id, result.handoff_token)
            else:
                await self.store.release_push(result.run_id, result.handoff_token)
        return result

    async def tick(self, *, max_runs: int = 10_000, time_limit: float | None = None) -> TickResult:
        """Dispatch every run that is due now (see :mod:`flowkeeper.scheduler`).

        Stops claiming after ``max_runs`` runs or ``time_limit`` seconds; the
        rest stay due for the next tick.
        """
        if self.dispatcher is None:
            raise ConfigurationError(
                "tick() needs the endpoint URL to invoke: pass endpoint=... or set "
                "FLOWKEEPER_ENDPOINT."
            )
        scheduler = self._scheduler
        if scheduler is None or scheduler.dispatcher is not self.dispatcher:
            scheduler = self._scheduler = Scheduler(
                self.store,
                self.dispatcher,
                dispatch_lease=self.dispatch_lease,
                alerts=self.alerts,
                event_retention=self.event_retention,
                schedules=self.schedules,
                pruner=self.pruner,
            )
        await self.reconcile_once(authoritative=False)
        return await scheduler.tick(max_runs=max_runs, time_limit=time_limit)

    # deploy -----------------------------------------------------------------------
    async def reconcile(self, *, authoritative: bool = True) -> None:
        """Write this process's cron schedules and retention policies into the database.

        The serving app (``authoritative``) does it on its first request, and
        stops what it no longer declares; ``fk.tick()`` only adds its own.
        """
        async with self.store.db.acquire() as conn, conn.transaction():
            removed = await self.schedules.reconcile(conn, authoritative=authoritative)
            await self.pruner.reconcile(conn, authoritative=authoritative)
        for name in removed:
            logger.info("schedule of workflow %r removed: no longer declared in code", name)
        self._deployed = True

    async def reconcile_once(self, *, authoritative: bool) -> None:
        """:meth:`reconcile` the first time only; errors are logged, never raised."""
        if self._deployed:
            return
        if (
            not authoritative
            and self.retention is None
            and not any(wf.schedule is not None or wf.retention is not None for wf in self.registry)
        ):
            self._deployed = True
            return
        try:
            await self.store.ensure_schema()
            await self.reconcile(authoritative=authoritative)
        except Exception:
            logger.exception("could not write the schedules and retention policies; retried")

    # reading ---------------------------------------------------------------------
    async def get_run(self, run_id: str) -> RunInfo:
        """The run as stored: status, input, output or error, steps with attempts."""
        rows = await self.store.get_run(check_run_id(run_id))
        if rows is None:
            raise RunNotFoundError(run_id)
        run, step_rows, event_rows = rows
        now = await self.store.clock_now()
        events = [
            RunEvent(
                id=e["id"],
                at=e["at"],
                kind=e["kind"],
                step_key=e["step_key"],
                attempt=e["attempt"],
                detail=json.loads(e["detail"]) if e["detail"] else None,
            )
            for e in event_rows
        ]
        failures: dict[str, list[AttemptError]] = {}
        for ev in events:
            if ev.kind in ("attempt_failed", "attempt_lost") and ev.step_key:
                failures.setdefault(ev.step_key, []).append(_attempt_error(ev))
        steps = [_step_info(r, now, failures.get(r["key"], [])) for r in step_rows]
        run_input = json_or_none(run["input"])
        outputs = {s.key: s.output for s in steps if s.kind == "step"}
        steps = [
            dataclasses.replace(s, input=stepinputs.resolve(s.input, outputs, run_input))
            if isinstance(s.input, dict) and "$refs" in s.input
            else s
            for s in steps
        ]
        if (
            run["status"] == "retrying"
            and run["step_key"]
            and not any(s.key == run["step_key"] for s in steps)
        ):
            key = run["step_key"]
            steps.append(
                StepInfo(
                    key=key,
                    name=key.split("#", 1)[0],
                    position=len(steps),
                    kind="step",
                    status="retrying",
                    attempts=run["step_attempt"],
                    error=json.loads(run["error"]) if run["error"] else None,
                    wake_at=run["due_at"],
                    failed_attempts=failures.get(key, []),
                )
            )
        return RunInfo(
            id=str(run["id"]),
            workflow=run["workflow"],
            status=RunStatus(run["status"]),
            input=run_input,
            output=json_or_none(run["output"]),
            error=json_or_none(run["error"]),
            idempotency_key=run["idempotency_key"],
            created_at=run["created_at"],
            updated_at=run["updated_at"],
            started_at=run["started_at"],
            finished_at=run["finished_at"],
            due_at=run["due_at"],
            invocations=run["invocations"],
            steps=steps,
            events=events,
            code_version=run["code_version"],
        )

    async def cancel(self, run_id: str, *, reason: str | None = None) -> bool:
        """Cancel a live run.  Returns False if it had already finished.

        Nothing after the cancellation is recorded and no further step starts.
        A step executing right now is stopped by its invocation within a
        heartbeat (a third of the lease): an async step's task is cancelled; a
        sync step cannot be interrupted, so its invocation waits for it to
        return.  Until that invocation has stopped, the run stays held and
        :meth:`replay` refuses it, so one step never runs twice at once.
        """
        cancelled, previous = await self.store.cancel(
            check_run_id(run_id), {"reason": reason or "cancelled by fk.cancel()"}
        )
        if previous is None:
            raise RunNotFoundError(run_id)
        return cancelled

    async def result(self, run_id: str, *, timeout: float | None = None) -> Any:
        """Wait until the run finishes; return its output (as the workflow's annotation).

        Raises :class:`RunFailedError` or :class:`RunCancelledError` when it did
        not complete, and :class:`RunTimeoutError` after ``timeout`` seconds.
        """
        check_run_id(run_id)
        give_up = None if timeout is None else time.monotonic() + timeout
        pause = 0.02
        while True:
            row = await self.store.run_status(run_id)
            if row is None:
                raise RunNotFoundError(run_id)
            status = row["status"]
            if status == "completed":
                if row["workflow"] in self.registry:
                    return self.registry.get(row["workflow"]).load_output(row["output"])
                return json_or_none(row["output"])
            if status == "failed":
                raise RunFailedError(run_id, json_or_none(row["error"]))
            if status == "cancelled":
                raise RunCancelledError(run_id)
            if give_up is not None and time.monotonic() >= give_up:
                raise RunTimeoutError(
                    f"Run {run_id} is still {status} after {timeout}s; it goes on without you."
                )
            wait = pause if give_up is None else min(pause, max(0.0, give_up - time.monotonic()))
            await asyncio.sleep(wait)
            pause = min(pause * 1.5, 0.5)

    # operations -------------------------------------------------------------------
    async def migrate(self) -> list[int]:
        """Create or upgrade the schema now; return the versions applied."""
        return await self.store.migrate()

    def asgi(self, **options: Any) -> Starlette:
        """The Starlette app to mount at ``/api/flowkeeper`` (see :mod:`flowkeeper.endpoint`)."""
        from .endpoint import create_app

        return create_app(self, **options)

    def wsgi(self, **options: Any) -> Any:
        """The endpoint as a WSGI app, for Flask/Django (a2wsgi; see :mod:`flowkeeper.wsgi`)."""
        from .wsgi import wsgi_app

        return wsgi_app(self, **options)

    async def aclose(self) -> None:
        """Close the pool and the HTTP client (waits for pending pushes), export spans.

        The instance stays usable: the next call opens a new pool and client.
        Hosts that freeze between requests (Lambda) call this after each one.
        """
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.flush_telemetry()
        if self.dispatcher is not None:
            await self.dispatcher.aclose()
        await self.db.close()

    async def __aenter__(self) -> FlowKeeper:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _parse_time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _attempt_error(ev: RunEvent) -> AttemptError:
    detail = ev.detail or {}
    error = detail.get("error") or {}
    retry_in = detail.get("retry_in")
    retry_at = ev.at + timedelta(seconds=float(retry_in)) if retry_in is not None else None
    return AttemptError(
        attempt=ev.attempt or 0,
        error_type=str(error.get("type", "Error")),
        message=str(error.get("message", "")),
        traceback=error.get("traceback"),
        started_at=_parse_time(detail.get("started_at")),
        finished_at=_parse_time(detail.get("finished_at")) or ev.at,
        retry_at=retry_at,
    )


def _step_info(row: Any, now: datetime, failures: list[AttemptError]) -> StepInfo:
    status = row["status"]
    if row["kind"] == "sleep":
        status = "sleeping" if row["wake_at"] and row["wake_at"] > now else "completed"
    return StepInfo(
        key=row["key"],
        name=row["name"],
        position=row["position"],
        kind=row["kind"],
        status=status,
        attempts=row["attempts"],
        input=json_or_none(row["input"]),
        output=json_or_none(row["output"]),
        error=json_or_none(row["error"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"] or (row["wake_at"] if status == "completed" else None),
        wake_at=row["wake_at"],
        failed_attempts=failures,
    )


def _dashboard_path(path: str | None) -> str | None:
    if path is None:
        return None
    if not isinstance(path, str) or not path.startswith("/") or path.rstrip("/") == "":
        raise ConfigurationError(
            f"dashboard_path must be a path under the endpoint such as '/ui', got {path!r} "
            "(None turns the dashboard off)."
        )
    if any(c in path for c in "?#\"\\'<> "):
        raise ConfigurationError(f"dashboard_path {path!r} must be a plain URL path.")
    return path.rstrip("/")
