"""OpenTelemetry tracing (placeholder, filled in below)."""

from __future__ import annotations

from typing import Any


def setup(engine: Any, store: Any, *, enabled: bool | None) -> Any:
    return None
