"""flowkeeper: durable, retryable, step-based workflows on the Postgres you already run.

Each step executes inside a signed HTTP request to your own app; a small
scheduler resumes runs that sleep, retry, or whose invocation died.  See
README.md for the quickstart.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .alerts import FailureAlert
from .children import ChildHandle
from .client import FlowKeeper
from .context import Context
from .errors import (
    AttemptLostError,
    ChildFailedError,
    ChildTimeoutError,
    CodecKeyError,
    ConfigurationError,
    DatabaseError,
    DatabaseRefusedError,
    DecryptionError,
    DeterminismError,
    DispatchError,
    DuplicateWorkflowError,
    EventNotFoundError,
    FlowKeeperError,
    InvalidEventError,
    InvalidInputError,
    MigrationError,
    NonRetriableError,
    RetryAfterError,
    RunCancelledError,
    RunFailedError,
    RunNotFoundError,
    RunStateError,
    RunTimeoutError,
    SerializationError,
    SignatureError,
    StepFailedError,
    StepTimeoutError,
    StepUsageError,
    TokenCompletedError,
    TokenError,
    TokenExpiredError,
    TokenNotFoundError,
    TransactionDatabaseError,
    TransactionError,
    TransactionUsageError,
    UnknownWorkflowError,
    WorkflowError,
)
from .eventlist import EventFilter, EventPage
from .eventops import EventInfo, WaitInfo
from .events import CancelOn, SentEvent
from .flowcontrol import Concurrency, Debounce, RateLimit
from .models import AttemptError, RunEvent, RunHandle, RunInfo, RunStatus, StepInfo, TickResult
from .patches import PatchBranches, source_hash
from .retention import Retention
from .retry import RetryPolicy
from .runlist import RunFilter, RunPage, RunSummary
from .stepctx import StepContext, current_step
from .tokens import Token
from .workflow import Workflow, define_workflow

__all__ = [
    "AttemptError",
    "AttemptLostError",
    "CancelOn",
    "ChildFailedError",
    "ChildHandle",
    "ChildTimeoutError",
    "CodecKeyError",
    "Concurrency",
    "ConfigurationError",
    "Context",
    "DatabaseError",
    "DatabaseRefusedError",
    "Debounce",
    "DecryptionError",
    "DeterminismError",
    "DispatchError",
    "DuplicateWorkflowError",
    "EventFilter",
    "EventInfo",
    "EventNotFoundError",
    "EventPage",
    "FailureAlert",
    "FlowKeeper",
    "FlowKeeperError",
    "InvalidEventError",
    "InvalidInputError",
    "MigrationError",
    "NonRetriableError",
    "PatchBranches",
    "RateLimit",
    "Retention",
    "RetryAfterError",
    "RetryPolicy",
    "RunCancelledError",
    "RunEvent",
    "RunFailedError",
    "RunFilter",
    "RunHandle",
    "RunInfo",
    "RunNotFoundError",
    "RunPage",
    "RunStateError",
    "RunStatus",
    "RunSummary",
    "RunTimeoutError",
    "SentEvent",
    "SerializationError",
    "SignatureError",
    "StepContext",
    "StepFailedError",
    "StepInfo",
    "StepTimeoutError",
    "StepUsageError",
    "TickResult",
    "Token",
    "TokenCompletedError",
    "TokenError",
    "TokenExpiredError",
    "TokenNotFoundError",
    "TransactionDatabaseError",
    "TransactionError",
    "TransactionUsageError",
    "UnknownWorkflowError",
    "WaitInfo",
    "Workflow",
    "WorkflowError",
    "__version__",
    "current_step",
    "define_workflow",
    "source_hash",
]
