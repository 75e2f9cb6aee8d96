"""``flowkeeper status``: the schema's size on disk, rows per table, concurrency keys.

What a free-tier user watches: how big the flowkeeper schema is and which
table grows (retention prunes finished runs on every tick; see the README),
and which concurrency keys hold slots or have runs waiting.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..flowcontrol import FlowStatus, human_bytes
from .common import add_connection_options, flowkeeper_from_args


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "status", help="schema size, rows per table, concurrency slot usage"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_connection_options(parser)
    parser.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    fk = flowkeeper_from_args(args)
    try:
        status = FlowStatus(fk.store)
        tables = await status.schema_usage()
        keys = await status.key_usage(20)
    finally:
        await fk.aclose()
    total = sum(t.bytes for t in tables)
    if args.json:
        print(
            json.dumps(
                {
                    "schema": fk.schema,
                    "bytes": total,
                    "tables": [t.__dict__ for t in tables],
                    "keys": [k.__dict__ for k in keys],
                },
                indent=2,
            )
        )
        return 0
    print(f"schema {fk.schema}: {human_bytes(total)} on disk (tables, indexes and TOAST)")
    width = max([len(t.name) for t in tables] + [5])
    print(f"  {'TABLE'.ljust(width)}  {'ROWS':>12}  {'SIZE':>10}")
    for t in tables:
        rows = f"~{t.rows}" if t.estimated else str(t.rows)
        print(f"  {t.name.ljust(width)}  {rows:>12}  {human_bytes(t.bytes):>10}")
    if keys:
        print("concurrency keys (slots held / limit, runs waiting):")
        for k in keys:
            print(
                f"  {k.key}: {k.held}/{k.limit if k.limit is not None else '?'}, {k.parked} waiting"
            )
    return 0
