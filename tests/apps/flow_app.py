"""The flow-control fault app: ``uvicorn tests.apps.flow_app:app``, SIGKILLed by the tests."""

from __future__ import annotations

import os

from flowkeeper import FlowKeeper

from .flow import limited_workflow

fk = FlowKeeper(
    lease=float(os.environ.get("FAULT_LEASE", "1.5")),
    dispatch_lease=float(os.environ.get("FAULT_LEASE", "1.5")),
)
fk.register(limited_workflow)
app = fk.asgi()
