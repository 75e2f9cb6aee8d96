"""``flowkeeper migrate``: create or upgrade the schema."""

from __future__ import annotations

import argparse
from typing import Any

from ..migrations import latest_version
from .common import add_connection_options, flowkeeper_from_args


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "migrate", help="create or upgrade the flowkeeper schema (safe to run concurrently)"
    )
    add_connection_options(parser, endpoint=False)
    parser.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    fk = flowkeeper_from_args(args)
    try:
        applied = await fk.migrate()
    finally:
        await fk.aclose()
    if applied:
        word = "migration" if len(applied) == 1 else "migrations"
        print(f"schema {fk.schema}: applied {word} {', '.join(map(str, applied))}")
    else:
        print(f"schema {fk.schema}: up to date (version {latest_version()})")
    return 0
