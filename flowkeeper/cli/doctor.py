"""``flowkeeper doctor``: check database, schema, endpoint, signing key, drivers, backlog."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import doctor
from .common import add_connection_options, flowkeeper_from_args


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "doctor",
        help="check the whole chain (database, schema, endpoint, signing key, drivers, "
        "overdue runs) and print what to fix",
    )
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument(
        "--overdue-after",
        type=float,
        default=180.0,
        help="a run due for longer than this many seconds is overdue (180)",
    )
    add_connection_options(parser)
    parser.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    fk = flowkeeper_from_args(args)
    try:
        checks = await doctor.run(fk, overdue_after=args.overdue_after)
    finally:
        await fk.aclose()
    if args.json:
        print(json.dumps([c.as_json() for c in checks], indent=2))
    else:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<17} {c.message}")
            if c.fix:
                print(f"      {'':<17} fix: {c.fix}")
        bad = [c for c in checks if not c.ok]
        print()
        print("all checks passed" if not bad else f"{len(bad)} problem(s): fix them in this order")
    return 0 if all(c.ok for c in checks) else 1
