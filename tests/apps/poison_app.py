"""The poison workload's app: ``uvicorn tests.apps.poison_app:app``, configured by environment."""

from __future__ import annotations

import os

from flowkeeper import FlowKeeper

from .poison import WORKFLOWS

fk = FlowKeeper(
    lease=float(os.environ.get("FAULT_LEASE", "1.5")),
    dispatch_lease=float(os.environ.get("FAULT_LEASE", "1.5")),
)
for workflow in WORKFLOWS:
    fk.register(workflow)
app = fk.asgi()
