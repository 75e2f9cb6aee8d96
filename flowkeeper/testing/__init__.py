"""Helpers for tests and local development: a private Postgres, a movable clock."""

from __future__ import annotations

from .clock import FakeClock
from .postgres import PostgresCluster, PostgresNotFoundError

__all__ = ["FakeClock", "PostgresCluster", "PostgresNotFoundError"]
