"""The ``flowkeeper`` command line.

Each command group lives in its own module and registers itself through
``register(subparsers)``; ``main`` wires them together.  Commands print (the
library itself only logs) and exit non-zero with a clear message on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from ..errors import FlowKeeperError
from . import dev, doctor, events, migrate, pgcron, runs, scheduler, schedules, status, tick

#: Modules that add commands: each has ``register(subparsers)``.
COMMANDS = [dev, migrate, tick, scheduler, pgcron, runs, events, schedules, status, doctor]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowkeeper",
        description=(
            "Durable workflows on Postgres: migrate the schema, drive due runs, "
            "inspect and replay runs, send and inspect events."
        ),
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = args.handler(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except FlowKeeperError as exc:
        print(f"flowkeeper: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
