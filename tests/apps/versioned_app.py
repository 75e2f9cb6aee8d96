"""``APP_VERSION=1|2 uvicorn tests.apps.versioned_app:app``: one deploy of the order workflow."""

from __future__ import annotations

import os

from flowkeeper import FlowKeeper

from .versioned import V1, V2

fk = FlowKeeper(lease=2.0, dispatch_lease=2.0)
fk.register(V2 if os.environ.get("APP_VERSION") == "2" else V1)
app = fk.asgi()
