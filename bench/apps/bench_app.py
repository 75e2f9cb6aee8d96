"""The app the benchmarks serve: ``uvicorn bench.apps.bench_app:app`` (configured by env)."""

from __future__ import annotations

import os

from flowkeeper import FlowKeeper

from .workflows import WORKFLOWS

fk = FlowKeeper(
    pool_size=int(os.environ.get("FLOWKEEPER_POOL_SIZE", "5")),
    group_commit=os.environ.get("FLOWKEEPER_GROUP_COMMIT", "1") != "0",
)
# bench.growth --only lean: the full commit statement for every write, to compare.
fk.store.lean_commit = os.environ.get("FLOWKEEPER_BENCH_LEAN_COMMIT", "1") != "0"
for wf in WORKFLOWS.values():
    fk.register(wf)

app = fk.asgi()
