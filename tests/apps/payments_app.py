"""The payments fault-test app: ``uvicorn tests.apps.payments_app:app``."""

from __future__ import annotations

import os

from flowkeeper import FlowKeeper

from .payments import charging_workflow, ordering_workflow

fk = FlowKeeper(
    lease=float(os.environ.get("FAULT_LEASE", "1.5")),
    dispatch_lease=float(os.environ.get("FAULT_LEASE", "1.5")),
)
fk.register(charging_workflow)
fk.register(ordering_workflow)
app = fk.asgi()
