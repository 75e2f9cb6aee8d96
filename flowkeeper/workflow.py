"""Workflow definitions and the registry that names them."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic
import pydantic_core

from . import patches, serialization
from .errors import (
    ConfigurationError,
    DuplicateWorkflowError,
    InvalidInputError,
    UnknownWorkflowError,
    WorkflowError,
)
from .events import CancelOn, check_event_name
from .flowcontrol import (
    NO_KEYS,
    Concurrency,
    Debounce,
    FlowKeys,
    RateLimit,
    check_concurrency,
    check_debounce,
    check_priority,
    check_rate_limit,
    check_timeout,
    flow_keys,
)
from .names import name_problem, shown
from .retention import Retention, check_retention
from .retry import RetryPolicy
from .schedules import Schedule, check_schedule

WorkflowFunction = Callable[..., Awaitable[Any]]
#: Called with a :class:`flowkeeper.alerts.FailureAlert` when a run fails for good.
FailureHook = Callable[[Any], Any]

_MAX_NAME = 200


def validate_name(name: str, what: str = "workflow") -> str:
    """Names are stored and shown everywhere: keep them printable and short."""
    problem = name_problem(name, _MAX_NAME)
    if problem is not None:
        raise WorkflowError(f"The {what} name {shown(name)} {problem}.")
    return name


@dataclass(eq=False)
class Workflow:
    """A named workflow function and how to treat its input, output and failures.

    Build one with :func:`define_workflow` (or the ``@fk.workflow`` decorator).
    """

    name: str
    fn: WorkflowFunction
    retry: RetryPolicy | None = None
    on_failure: FailureHook | None = None
    on_event: str | None = None  # start a run per event of this name (its data the input)
    cancel_on: Sequence[CancelOn] = ()  # cancel live runs when a matching event arrives
    version: str | None = None  # the code version recorded on each run it starts
    concurrency: Sequence[Concurrency] = ()  # flow control (flowkeeper.flowcontrol)
    rate_limit: Sequence[RateLimit] = ()  # throttled starts (flowkeeper.flowcontrol)
    debounce: Debounce | None = None  # bursts of triggers become one run
    priority: int = 0  # the default priority of its runs (minutes of head start)
    schedule: Schedule | None = None  # cron (flowkeeper.schedules)
    timeout: timedelta | None = None  # fail a run not finished this long after its trigger
    start_timeout: timedelta | None = None  # ... or not started this long after it
    retention: Retention | None = None  # its own retention of finished runs
    takes_input: bool = field(init=False)
    input_type: Any = field(init=False)
    output_type: Any = field(init=False)

    def __post_init__(self) -> None:
        validate_name(self.name)
        self.concurrency = check_concurrency(self.name, self.concurrency)
        self.rate_limit = check_rate_limit(self.name, self.rate_limit)
        self.debounce = check_debounce(self.name, self.debounce)
        self.priority = check_priority(self.priority, f"Workflow {self.name!r}")
        self.timeout = check_timeout(self.timeout, f"Workflow {self.name!r}: timeout")
        self.start_timeout = check_timeout(
            self.start_timeout, f"Workflow {self.name!r}: start_timeout"
        )
        if not inspect.iscoroutinefunction(self.fn):
            raise WorkflowError(
                f"Workflow {self.name!r}: {getattr(self.fn, '__qualname__', self.fn)!r} must be "
                "an 'async def' function taking (ctx) or (ctx, input)."
            )
        params = list(inspect.signature(self.fn).parameters.values())
        positional = [
            p
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        if not 1 <= len(positional) <= 2:
            raise WorkflowError(
                f"Workflow {self.name!r} must take (ctx) or (ctx, input); "
                f"it takes {len(positional)} required positional parameters."
            )
        try:
            hints = typing.get_type_hints(self.fn)
        except Exception as exc:
            raise WorkflowError(
                f"Workflow {self.name!r}: cannot resolve the annotations of "
                f"{getattr(self.fn, '__qualname__', self.fn)} ({exc}). Define the types it "
                "uses (input model, return type) at module level so they can be resolved."
            ) from exc
        self.takes_input = len(positional) == 2
        self.input_type = hints.get(positional[1].name, Any) if self.takes_input else None
        self.output_type = hints.get("return")
        if self.schedule is not None and self.takes_input:
            try:  # a cron run's input is its slot time
                self.dump_input(datetime.now(UTC))
            except InvalidInputError:
                raise ConfigurationError(
                    f"Workflow {self.name!r} runs on a cron schedule: its input is the slot "
                    "time, so annotate it as datetime (or take no input)."
                ) from None
        for what, tp in (("input", self.input_type), ("return", self.output_type)):
            if tp is None:
                continue
            try:
                serialization.adapter_for(tp)
            except Exception as exc:  # pydantic cannot build a validator for it
                raise WorkflowError(
                    f"Workflow {self.name!r}: pydantic cannot validate its {what} annotation "
                    f"{tp!r}: {exc}. Use a pydantic model, a dataclass, a TypedDict or "
                    "JSON-compatible types."
                ) from exc

    # input ---------------------------------------------------------------
    def dump_input(self, value: Any) -> str:
        """Validate ``value`` against the input annotation and return its JSON.

        Raises :class:`InvalidInputError` with pydantic's message when it does
        not fit, so a bad input never becomes a run.
        """
        if not self.takes_input:
            if value is not None:
                raise InvalidInputError(
                    self.name, "This workflow takes no input, but one was given."
                )
            return "null"
        adapter = serialization.adapter_for(self.input_type)
        try:
            validated = adapter.validate_python(value)
        except pydantic.ValidationError as exc:
            raise InvalidInputError(self.name, str(exc)) from None
        try:
            text = adapter.dump_json(validated).decode()
        except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
            raise InvalidInputError(
                self.name, f"The input cannot be stored as JSON: {exc}"
            ) from None
        if serialization.has_nul(text):
            raise InvalidInputError(
                self.name,
                "The input contains a NUL character (\\u0000), which Postgres cannot store. "
                "Strip it, or encode binary data (e.g. base64).",
            )
        # pydantic writes NaN and infinities as null here: the run would see None.
        if "null" in text and serialization.has_nonfinite(
            pydantic_core.to_json(validated, fallback=str).decode()
        ):
            raise InvalidInputError(
                self.name,
                "The input contains NaN or an infinity, which JSON cannot represent. "
                "Use None, a string or a finite number.",
            )
        return text

    def load_input(self, text: str | None) -> Any:
        """The stored input, as the annotated type."""
        if not self.takes_input:
            return None
        return serialization.loads(text, self.input_type, what=f"Input of workflow {self.name!r}")

    @property
    def flow_controlled(self) -> bool:
        """Whether its runs carry anything the claim enforces (flowkeeper.flowcontrol)."""
        return bool(
            self.concurrency
            or self.rate_limit
            or self.debounce
            or self.priority
            or self.timeout
            or self.start_timeout
        )

    def flow(self, input_json: str) -> FlowKeys:
        """The concurrency keys of a run with this (stored) input; see flowcontrol."""
        if not self.concurrency and not self.rate_limit:
            return NO_KEYS
        return flow_keys(self.name, self.concurrency, self.load_input(input_json), self.rate_limit)

    # output --------------------------------------------------------------
    def dump_output(self, value: Any) -> str:
        return serialization.dumps(value, what=f"The return value of workflow {self.name!r}")

    def load_output(self, text: str | None) -> Any:
        return serialization.loads(text, self.output_type, what=f"Output of workflow {self.name!r}")


def define_workflow(
    name: str,
    fn: WorkflowFunction,
    *,
    retry: RetryPolicy | None = None,
    on_failure: FailureHook | None = None,
    on_event: str | None = None,
    cancel_on: Sequence[CancelOn] = (),
    version: str | Callable[[WorkflowFunction], str] | None = None,
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
) -> Workflow:
    """Define a workflow: ``fn`` is an ``async def`` taking ``(ctx)`` or ``(ctx, input)``.

    The input parameter's annotation (a pydantic model, a TypedDict, ``int``...)
    validates inputs at trigger time.  ``retry`` is the default policy for this
    workflow's steps.  ``on_failure`` (sync or async) is called with a
    :class:`~flowkeeper.alerts.FailureAlert` when a run fails for good; it is
    retried with backoff until it returns without raising.  ``on_event`` starts
    one run per event of that name, its data the input (the event's id is the
    idempotency key: a duplicate event never starts two runs).  ``cancel_on``
    cancels a live run when an event matching one of its :class:`CancelOn`
    rules arrives.  ``version`` (a string, or :func:`flowkeeper.source_hash` to
    derive one from the function's source) is recorded on each run it starts.
    ``concurrency`` (one :class:`Concurrency` or several) caps
    the runs executing at once per key; ``rate_limit`` (one :class:`RateLimit`
    or several) spaces their starts; ``debounce`` merges a burst of triggers
    into one run with the latest input (with ``on_event``, events merge the
    same way); ``priority`` (0..1000) is its runs'
    default priority (see :mod:`flowkeeper.flowcontrol`).  ``cron`` (with
    ``timezone``, UTC by default, and ``catch_up``: "latest", "all" or
    "none") starts one run per slot, its input the slot time (see
    :mod:`flowkeeper.schedules`).  ``timeout`` fails a run (with a
    :class:`RunTimeoutError` naming the deadline) that has not finished that
    long after it was triggered, ``start_timeout`` one not started by then.
    ``retention`` keeps its finished runs that long (see :mod:`flowkeeper.retention`).
    Register the result with ``fk.register(wf)``.
    """
    if on_failure is not None and not callable(on_failure):
        raise WorkflowError(f"Workflow {name!r}: on_failure must be a function, got {on_failure!r}")
    if on_event is not None:
        check_event_name(on_event, "on_event name")
    rules = tuple(cancel_on)
    for rule in rules:
        if not isinstance(rule, CancelOn):
            raise WorkflowError(
                f"Workflow {name!r}: cancel_on takes CancelOn(event, match=...) rules, got {rule!r}"
            )
    return Workflow(
        name=name,
        fn=fn,
        retry=retry,
        on_failure=on_failure,
        on_event=on_event,
        cancel_on=rules,
        version=patches.code_version(name, fn, version),
        concurrency=check_concurrency(name, concurrency),
        rate_limit=check_rate_limit(name, rate_limit),
        debounce=check_debounce(name, debounce),
        priority=priority,
        schedule=check_schedule(name, cron, timezone, catch_up),
        timeout=check_timeout(timeout, f"Workflow {name!r}: timeout"),
        start_timeout=check_timeout(start_timeout, f"Workflow {name!r}: start_timeout"),
        retention=check_retention(retention, f"Workflow {name!r}"),
    )


class Registry:
    """The workflows this process can trigger and execute."""

    def __init__(self) -> None:
        self._workflows: dict[str, Workflow] = {}

    def add(self, wf: Workflow) -> Workflow:
        existing = self._workflows.get(wf.name)
        if existing is not None and existing.fn is not wf.fn:
            raise DuplicateWorkflowError(
                f"A different function is already registered as workflow {wf.name!r} "
                f"({getattr(existing.fn, '__qualname__', existing.fn)}). Workflow names must be "
                "unique."
            )
        self._workflows[wf.name] = wf
        return wf

    def get(self, name: str) -> Workflow:
        try:
            return self._workflows[name]
        except KeyError:
            raise UnknownWorkflowError(name, list(self._workflows)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._workflows

    def __iter__(self) -> Iterator[Workflow]:
        return iter(self._workflows.values())

    def names(self) -> list[str]:
        return sorted(self._workflows)

    def workflows(self) -> list[Workflow]:
        return list(self._workflows.values())
