"""The event-race fault-test app: ``uvicorn tests.apps.event_race_app:app``, configured by env."""

from __future__ import annotations

import os

from flowkeeper import FlowKeeper

from .event_race import racer_workflow

fk = FlowKeeper(
    lease=float(os.environ.get("FAULT_LEASE", "1.5")),
    dispatch_lease=float(os.environ.get("FAULT_LEASE", "1.5")),
)
fk.register(racer_workflow)
app = fk.asgi()
