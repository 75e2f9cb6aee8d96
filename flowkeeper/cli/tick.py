"""``flowkeeper tick``: dispatch every due run once (for cron, CronJobs, CI schedules).

Exit codes: 0 all due runs dispatched (or none was due); 1 configuration or
database error (nothing was claimed); 3 the endpoint could not be reached or
refused some invocations (those runs stay due and are retried with backoff).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..scheduler import Scheduler
from .common import add_connection_options, flowkeeper_from_args, plural

#: Exit status when invocations could not be delivered.
EXIT_UNDELIVERED = 3


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "tick",
        help="invoke the endpoint for every run that is due now, then exit",
        description="Invoke the endpoint for every run that is due now, then exit. "
        "Exit status 0: done; 1: configuration or database error; 3: some invocations "
        "could not be delivered (they stay due and are retried with backoff).",
    )
    add_connection_options(parser)
    parser.add_argument("--max-runs", type=int, default=10_000, help="stop after this many")
    parser.add_argument(
        "--time-limit", type=float, metavar="SECONDS", help="stop claiming after this long"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="invocations in flight at once (32)"
    )
    parser.add_argument("--batch-size", type=int, default=200, help="runs per claim (200)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="first send a signed probe (a run id that cannot exist) to check that the "
        "endpoint answers, shares the signing key and reaches its database",
    )
    parser.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    fk = flowkeeper_from_args(args, need_endpoint=True)
    assert fk.dispatcher is not None
    scheduler = Scheduler(
        fk.store,
        fk.dispatcher,
        dispatch_lease=fk.dispatch_lease,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        event_retention=fk.event_retention,
        schedules=fk.schedules,
        pruner=fk.pruner,
    )
    scheduler.driver = "cli"
    endpoint = fk.dispatcher.endpoint
    try:
        if args.check:
            probe = await scheduler.probe()
            if not probe.delivered:
                print(
                    f"flowkeeper: endpoint {endpoint} failed the check: {probe.reason}",
                    file=sys.stderr,
                )
                return EXIT_UNDELIVERED
            print(f"endpoint {endpoint}: reachable, signing key accepted, database reachable")
        result = await scheduler.tick(max_runs=args.max_runs, time_limit=args.time_limit)
    finally:
        await fk.aclose()
    print(f"claimed {result.claimed}, dispatched {result.dispatched}, failed {result.failed}")
    if result.failed:
        print(
            f"flowkeeper: {plural(result.failed, 'invocation')} could not be delivered to "
            f"{endpoint}; "
            "those runs stay due and are retried with backoff:",
            file=sys.stderr,
        )
        for reason, count in sorted(result.errors.items(), key=lambda item: -item[1]):
            print(f"  {count} x {reason}", file=sys.stderr)
        return EXIT_UNDELIVERED
    return 0
