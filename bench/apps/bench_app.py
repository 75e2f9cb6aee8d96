"""The app the benchmarks serve: ``uvicorn bench.apps.bench_app:app`` (configured by env)."""

from __future__ import annotations

import os

from flowkeeper import FlowKeeper

from .workflows import WORKFLOWS

fk = FlowKeeper(
    pool_size=int(os.environ.get("FLOWKEEPER_POOL_SIZE", "5")),
    group_commit=os.environ.get("FLOWKEEPER_GROUP_COMMIT", "1") != "0",
)
# bench.growth --only lean: "full" sends the full commit statement for every
# write, "lean" the lean one but one statement per write, "merged" (the default)
# a batch's lean writes as one statement.
_write_path = os.environ.get("FLOWKEEPER_BENCH_WRITE_PATH", "merged")
fk.store.lean_commit = _write_path != "full"
fk.store.merge_commits = _write_path == "merged"
for wf in WORKFLOWS.values():
    fk.register(wf)

app = fk.asgi()
