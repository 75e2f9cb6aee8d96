"""The step rate-limit fault app: ``uvicorn tests.apps.steprate_app:app``, SIGKILLed by the tests."""

from __future__ import annotations

import os

from flowkeeper import FlowKeeper

from .steprate import LIMITS, workflow

fk = FlowKeeper(
    lease=float(os.environ.get("FAULT_LEASE", "1.5")),
    dispatch_lease=float(os.environ.get("FAULT_LEASE", "1.5")),
    rate_limits=LIMITS,
)
fk.register(workflow)
app = fk.asgi()
