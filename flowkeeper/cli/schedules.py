"""``flowkeeper schedules list|pause|resume|run-now``: the cron schedules in the database.

Schedules are declared in code (``@fk.workflow(..., cron=...)``) and written
by the serving app when it starts; these commands show them and pause,
resume or start one run now.  ``run-now`` leaves the run due for the
scheduler (or pushes it, with the signing key configured).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from .common import add_connection_options, flowkeeper_for_actions, flowkeeper_from_args


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "schedules", help="list, pause, resume or run now the cron schedules"
    )
    actions = parser.add_subparsers(dest="schedules_command", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("list", help="every schedule: cron, zone, state, next and last slot")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_options(p)
    p.set_defaults(handler=run_list)

    for name, handler, text in (
        ("pause", run_pause, "stop firing a schedule until it is resumed"),
        ("resume", run_resume, "fire again from the next slot (the paused ones are skipped)"),
        ("run-now", run_now, "start one run of a scheduled workflow now"),
    ):
        p = actions.add_parser(name, help=text)
        p.add_argument("workflow")
        add_connection_options(p)
        p.set_defaults(handler=handler)


def _when(at: datetime | None) -> str:
    return at.isoformat(timespec="seconds") if at is not None else "-"


async def run_list(args: argparse.Namespace) -> int:
    fk = flowkeeper_from_args(args)
    try:
        infos = await fk.schedules.list()
    finally:
        await fk.aclose()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "workflow": i.workflow,
                        "cron": i.cron,
                        "timezone": i.timezone,
                        "catch_up": i.catch_up,
                        "state": i.state,
                        "next_at": _when(i.next_at) if i.next_at else None,
                        "last_slot": _when(i.last_slot) if i.last_slot else None,
                        "last_run": i.last_run,
                        "last_status": i.last_status,
                        "fired": i.fired,
                        "skipped": i.skipped,
                    }
                    for i in infos
                ],
                indent=2,
            )
        )
        return 0
    if not infos:
        print("no schedules (they are written when the app declaring cron=... starts)")
        return 0
    rows = [("WORKFLOW", "CRON", "ZONE", "STATE", "NEXT (UTC)", "LAST SLOT", "LAST RUN", "FIRED")]
    for i in infos:
        rows.append(
            (
                i.workflow,
                i.cron,
                i.timezone,
                i.state,
                _when(i.next_at),
                _when(i.last_slot),
                f"{i.last_status or '-'}",
                f"{i.fired} ({i.skipped} skipped)",
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


async def run_pause(args: argparse.Namespace) -> int:
    fk = flowkeeper_from_args(args)
    try:
        await fk.schedules.pause(args.workflow)
    finally:
        await fk.aclose()
    print(f"paused the schedule of {args.workflow}")
    return 0


async def run_resume(args: argparse.Namespace) -> int:
    fk = flowkeeper_from_args(args)
    try:
        following = await fk.schedules.resume(args.workflow)
    finally:
        await fk.aclose()
    print(f"resumed the schedule of {args.workflow}; next slot {_when(following)}")
    return 0


async def run_now(args: argparse.Namespace) -> int:
    fk = flowkeeper_for_actions(args)
    try:
        run_id = await fk.schedules.run_now(args.workflow)
    finally:
        await fk.aclose()
    print(f"started run {run_id} of {args.workflow}")
    return 0
