"""``flowkeeper scheduler``: a long-running loop for hosts that are always on.

It wakes on NOTIFY when a run becomes due without a push and on a timer at the
next due time, so sleeps and retries resume within milliseconds.  SIGTERM and
SIGINT stop it cleanly: dispatches in flight finish, then it exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from typing import Any

from ..scheduler import CHANNEL, SchedulerLoop
from .common import add_connection_options, flowkeeper_from_args, plural


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "scheduler",
        help="run until stopped, invoking the endpoint the moment each run falls due",
        description="Run until SIGTERM/SIGINT, invoking the endpoint the moment each run "
        "falls due (LISTEN/NOTIFY plus a timer). Needs a direct or session-mode Postgres "
        "connection, not a transaction pooler. Several may run at once.",
    )
    add_connection_options(parser)
    parser.add_argument(
        "--listen-url",
        help="direct (session) Postgres URL for LISTEN when DATABASE_URL is a transaction "
        "pooler (FLOWKEEPER_LISTEN_URL)",
    )
    parser.add_argument(
        "--max-idle",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="look at the database at least this often even without notifications (30)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="invocations in flight at once (32)"
    )
    parser.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    fk = flowkeeper_from_args(args, need_endpoint=True)
    try:
        loop = SchedulerLoop(
            fk,
            listen_url=args.listen_url or os.environ.get("FLOWKEEPER_LISTEN_URL"),
            max_idle=args.max_idle,
            concurrency=args.concurrency,
        )
        running = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(sig, loop.stop)
        assert fk.dispatcher is not None
        print(
            f"flowkeeper scheduler: schema {fk.schema}, dispatching to {fk.dispatcher.endpoint} "
            "(stop with SIGTERM or Ctrl-C)",
            flush=True,
        )
        said = False

        def listening() -> None:
            # Said once connected, and once: a reconnect after an outage is logged instead.
            nonlocal said
            if not said:
                said = True
                print(f"flowkeeper scheduler: listening on {CHANNEL}", flush=True)

        loop.on_listening = listening
        started = time.monotonic()
        await loop.run()
    finally:
        await fk.aclose()
    print(
        f"flowkeeper scheduler: stopped after {time.monotonic() - started:.0f}s, "
        f"{plural(loop.ticks, 'tick')}, {plural(loop.dispatched, 'run')} dispatched",
        flush=True,
    )
    return 0
