"""The fault-test app: ``uvicorn tests.apps.crash_app:app``, configured by environment."""

from __future__ import annotations

import os

from flowkeeper import FlowKeeper

from .crashy import crashy_workflow, stalling_workflow

fk = FlowKeeper(
    lease=float(os.environ.get("FAULT_LEASE", "1.5")),
    dispatch_lease=float(os.environ.get("FAULT_LEASE", "1.5")),
)
fk.register(crashy_workflow)
fk.register(stalling_workflow)
app = fk.asgi()
