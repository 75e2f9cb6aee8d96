"""``flowkeeper tick``: dispatch every due run once (for cron, CronJobs, CI schedules)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_connection_options, flowkeeper_from_args


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "tick", help="invoke the endpoint for every run that is due now, then exit"
    )
    add_connection_options(parser)
    parser.add_argument("--max-runs", type=int, default=10_000, help="stop after this many")
    parser.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    fk = flowkeeper_from_args(args, need_endpoint=True)
    try:
        result = await fk.tick(max_runs=args.max_runs)
    finally:
        await fk.aclose()
    print(f"claimed {result.claimed}, dispatched {result.dispatched}, failed {result.failed}")
    return 1 if result.failed else 0
