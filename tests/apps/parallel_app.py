"""The parallel fault-test app: ``uvicorn tests.apps.parallel_app:app``, configured by environment."""

from __future__ import annotations

import os

from flowkeeper import FlowKeeper

from .parallel import fanout_workflow, gather_workflow, leaf_workflow

fk = FlowKeeper(
    lease=float(os.environ.get("FAULT_LEASE", "1.5")),
    dispatch_lease=float(os.environ.get("FAULT_LEASE", "1.5")),
)
fk.register(gather_workflow)
fk.register(fanout_workflow)
fk.register(leaf_workflow)
app = fk.asgi()
