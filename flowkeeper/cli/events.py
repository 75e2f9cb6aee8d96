"""``flowkeeper events send|list|show``: send an event, and see what events did.

``send NAME --data JSON [--id ID]`` stores the event and acts on it as
``fk.send_event`` does (wakes matching waits, starts ``on_event`` workflows,
applies ``cancel_on`` rules) and says what it did.  Runs it wakes are pushed
to the endpoint when the signing key is known, else left due for the
scheduler.  Workflows declared ``on_event=`` are started only by a sender
that knows them: pass ``--app module:fk``.  ``list`` pages through events
newest first (``--before`` cursor); ``show NUMBER`` prints one event's data
and the runs it woke, started or cancelled.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..boundary import parse_json
from ..errors import InvalidEventError, InvalidRequestError
from ..eventlist import MAX_EVENT_PAGE, EventFilter, parse_event_number
from ..eventops import EventInfo
from .common import add_connection_options, flowkeeper_for_actions
from .runs import _clip, _when, table

#: Exit status for input the command cannot use (as argparse's own errors).
USAGE = 2


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "events", help="send an event, list events, show what one woke, started or cancelled"
    )
    actions = parser.add_subparsers(dest="events_command", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("send", help="send an event (as fk.send_event) and say what it did")
    p.add_argument("name", help="the event name, e.g. invoice.paid")
    p.add_argument("--data", metavar="JSON", help="the event's data as JSON, e.g. '{\"a\": 1}'")
    p.add_argument("--id", metavar="ID", help="a dedup id: a second event with it does nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_connection_options(p)
    p.set_defaults(handler=event_send)

    p = actions.add_parser("list", help="events newest first, with the runs each woke")
    p.add_argument("--name", "-n", help="only events of this name (exact)")
    p.add_argument("--id", metavar="ID", help="only the event with this sender id (exact)")
    p.add_argument("--before", metavar="NUMBER", help="the page after this event (a cursor)")
    p.add_argument(
        "--limit", default="50", help=f"events per page (default 50, at most {MAX_EVENT_PAGE})"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_options(p, endpoint=False)
    p.set_defaults(handler=event_list)

    p = actions.add_parser("show", help="an event: its data and the runs it affected")
    p.add_argument("number", help="the event's number (as list and send print it)")
    p.add_argument("--json", action="store_true", help="print the event as JSON")
    add_connection_options(p, endpoint=False)
    p.set_defaults(handler=event_show)


def _refuse(message: str) -> int:
    print(f"flowkeeper: error: {message}", file=sys.stderr)
    return USAGE


def _runs(noun: str, ids: list[str]) -> list[str]:
    lines = [f"{noun} {len(ids)} run{'' if len(ids) == 1 else 's'}" + (":" if ids else "")]
    lines += [f"  {rid}" for rid in ids]
    return lines


async def event_send(args: argparse.Namespace) -> int:
    data: Any = None
    if args.data is not None:
        try:
            data = parse_json(args.data, what="--data")
        except InvalidRequestError as exc:
            return _refuse(f"{exc} Quote it for the shell, e.g. --data '{{\"order_id\": 42}}'.")
    fk = flowkeeper_for_actions(args)
    try:
        try:
            sent = await fk.send_event(args.name, data, id=args.id)
        except InvalidEventError as exc:
            return _refuse(str(exc))
        pushed = fk.dispatcher is not None
    finally:
        await fk.aclose()
    if args.json:
        out = {
            "number": sent.id,
            "duplicate": sent.duplicate,
            "woken": sent.woken,
            "started": sent.started,
            "cancelled": sent.cancelled,
        }
        print(json.dumps(out, indent=2))
        return 0
    if sent.duplicate:
        print(
            f"event id {args.id!r} was sent already, as event {sent.id}: nothing done "
            f"(duplicate; see flowkeeper events show {sent.id})"
        )
        return 0
    print(f"event {sent.id} sent: {args.name}")
    lines = _runs("woke", sent.woken) + _runs("started", sent.started)
    lines += _runs("cancelled", sent.cancelled)
    print("\n".join(lines))
    if sent.woken or sent.started:
        print(
            "pushed to the endpoint"
            if pushed
            else "due for the next scheduler tick (no signing key or endpoint here to push them)"
        )
    if not sent.started and not getattr(args, "app", None):
        print(
            "note: workflows declared on_event= start only when the sender knows them: "
            "pass --app module:fk"
        )
    return 0


def _effects(e: EventInfo) -> str:
    return f"woke {e.woke}, started {len(e.started)}, cancelled {e.cancelled}"


async def event_list(args: argparse.Namespace) -> int:
    f = EventFilter.build(name=args.name, event_id=args.id, before=args.before, limit=args.limit)
    fk = flowkeeper_for_actions(args)
    try:
        page = await fk.event_page(f)
    finally:
        await fk.aclose()
    if args.json:
        from ..dashboard.views import events_json

        print(json.dumps(events_json(page), indent=2))
        return 0
    if not page.events:
        print("no events match")
        return 0
    rows = [
        [
            str(e.id),
            _clip(e.name, 40),
            _clip(e.event_id or "", 24),
            _when(e.sent_at),
            e.sent_by_run or "",
            str(e.woke),
            str(len(e.started)),
            str(e.cancelled),
        ]
        for e in page.events
    ]
    print(table(["NUMBER", "NAME", "ID", "SENT", "BY RUN", "WOKE", "STARTED", "CANCELLED"], rows))
    if page.next_before:
        print(f"more: flowkeeper events list ... --before {page.next_before}")
    return 0


async def event_show(args: argparse.Namespace) -> int:
    number = parse_event_number(args.number)
    fk = flowkeeper_for_actions(args)
    try:
        info = await fk.require_event(number)
    finally:
        await fk.aclose()
    if args.json:
        from ..dashboard.views import event_json

        print(json.dumps(event_json(info), indent=2, default=str))
        return 0
    print(f"event     {info.id}")
    print(f"name      {info.name}")
    if info.event_id:
        print(f"id        {info.event_id}")
    print(f"sent      {_when(info.sent_at)}")
    print(f"by        {'run ' + info.sent_by_run if info.sent_by_run else 'application code'}")
    print(f"effect    {_effects(info)}")
    print("data")
    print("\n".join(f"  {line}" for line in json.dumps(info.data, indent=2).splitlines()))
    effects = info.effects or []
    if effects:
        print()
        rows = [
            [x["outcome"], x["run_id"], _clip(x["workflow"], 24), x["status"], x["wait"] or "-"]
            for x in effects
        ]
        print(table(["WHAT", "RUN", "WORKFLOW", "STATUS", "WAIT"], rows, colour_col=3))
    return 0
