"""The public API is what __all__ says, and every name in it exists."""

from __future__ import annotations

import flowkeeper


def test_all_names_exist() -> None:
    for name in flowkeeper.__all__:
        assert hasattr(flowkeeper, name), name


def test_public_api_is_exactly_this() -> None:
    expected = {
        "ChildFailedError",
        "ChildHandle",
        "ChildTimeoutError",
        "AttemptError",
        "TokenNotFoundError",
        "TokenExpiredError",
        "TokenError",
        "TokenCompletedError",
        "Token",
        "InvalidEventError",
        "SentEvent",
        "EventInfo",
        "EventFilter",
        "EventNotFoundError",
        "EventPage",
        "WaitInfo",
        "CancelOn",
        "Concurrency",
        "Debounce",
        "RateLimit",
        "Retention",
        "AttemptLostError",
        "ConfigurationError",
        "Context",
        "DatabaseError",
        "DatabaseRefusedError",
        "DeterminismError",
        "DispatchError",
        "DuplicateWorkflowError",
        "FailureAlert",
        "FlowKeeper",
        "FlowKeeperError",
        "InvalidInputError",
        "MigrationError",
        "NonRetriableError",
        "RetryAfterError",
        "RetryPolicy",
        "RunCancelledError",
        "RunEvent",
        "RunFailedError",
        "RunHandle",
        "RunInfo",
        "RunFilter",
        "RunNotFoundError",
        "RunPage",
        "RunStateError",
        "RunStatus",
        "RunSummary",
        "RunTimeoutError",
        "SerializationError",
        "SignatureError",
        "StepFailedError",
        "StepInfo",
        "StepTimeoutError",
        "StepUsageError",
        "TickResult",
        "UnknownWorkflowError",
        "Workflow",
        "WorkflowError",
        "__version__",
        "define_workflow",
        "StepContext",
        "current_step",
        "CodecKeyError",
        "DecryptionError",
        "source_hash",
        "PatchBranches",
        "TransactionDatabaseError",
        "TransactionError",
        "TransactionUsageError",
    }
    assert set(flowkeeper.__all__) == expected


def test_errors_share_one_base() -> None:
    for name in flowkeeper.__all__:
        obj = getattr(flowkeeper, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, flowkeeper.FlowKeeperError), name
