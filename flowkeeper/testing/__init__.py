"""Helpers for tests and local development.

A private Postgres (:class:`PostgresCluster`), a movable database clock
(:class:`FakeClock`), and a runner that drives your workflows to completion in
a test (:class:`WorkflowRunner`, used through the pytest plugin's
``flowkeeper_runner`` fixture; see :mod:`flowkeeper.testing.plugin`).
"""

from __future__ import annotations

from .clock import FakeClock
from .postgres import PostgresCluster, PostgresNotFoundError
from .runner import RunnerError, StepMock, WorkflowRunner

__all__ = [
    "FakeClock",
    "PostgresCluster",
    "PostgresNotFoundError",
    "RunnerError",
    "StepMock",
    "WorkflowRunner",
]
