"""The step rate-limit fault app: ``uvicorn tests.apps.steprate_app:app``, SIGKILLed by the tests."""

from __future__ import annotations

import os

from flowkeeper import FlowKeeper

from .steprate import LIMITS, run_workflow, workflow

fk = FlowKeeper(
    lease=float(os.environ.get("FAULT_LEASE", "1.5")),
    dispatch_lease=float(os.environ.get("FAULT_LEASE", "1.5")),
    rate_limits=LIMITS,
)
fk.register(workflow)
fk.register(run_workflow)
app = fk.asgi()
