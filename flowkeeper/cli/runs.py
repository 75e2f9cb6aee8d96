"""``flowkeeper runs list|show|replay|retry|cancel|prune``: the dashboard's view, in a terminal.

The filters are the dashboard's (``--workflow``, ``--status``, ``--since 2h``,
``--until``, ``--search`` run id or idempotency key, ``--before`` cursor);
``show`` prints the run's timeline as text and what it waits or waited
for.  Actions ask for confirmation (``--yes`` to skip it, required when stdin
is not a terminal) and are recorded on the run's history as done by ``cli``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import datetime
from typing import Any

from .. import deploys
from ..client import FlowKeeper
from ..dashboard.timeline import Lane, Timeline, build
from ..errors import ConfigurationError
from ..eventops import WaitInfo, match_text
from ..flowcontrol import FlowStatus
from ..health import overdue_note
from ..models import RunInfo
from ..runlist import RunFilter, RunSummary
from ..shortids import resolve_run_id
from ..steplogs import LogLine
from .common import add_connection_options, flowkeeper_for_actions, plural

_COLOURS = {
    "queued": "37",
    "running": "34",
    "sleeping": "35",
    "retrying": "33",
    "waiting": "35",
    "completed": "32",
    "failed": "31",
    "cancelled": "90",
}
# One character per span kind and outcome on the text timeline.
_GLYPHS = {"completed": "█", "failed": "X", "waiting": "·", "sleeping": "~", "running": ">"}
_WAIT_GLYPH = "="  # a wait for an event or a token, whatever its outcome


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "runs", help="list, inspect, replay, retry, cancel, fork and prune runs"
    )
    actions = parser.add_subparsers(dest="runs_command", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("list", help="runs newest first, with counts per status")
    _filters(p)
    p.add_argument("--before", metavar="RUN_ID", help="the page after this run (a cursor)")
    p.add_argument("--limit", type=int, default=50, help="runs per page (default 50)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--patch",
        metavar="ID",
        help="live runs per branch of ctx.patched(ID), and those still on the old branch",
    )
    add_connection_options(p)
    p.set_defaults(handler=run_list)

    p = actions.add_parser("show", help="a run: its steps, text timeline, errors and history")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true", help="print the run as JSON")
    p.add_argument("--traceback", action="store_true", help="print full tracebacks")
    p.add_argument("--logs", action="store_true", help="print the log lines the run's code emitted")
    add_connection_options(p)
    p.set_defaults(handler=run_show)

    p = actions.add_parser(
        "replay", help="run a finished run again from a step (earlier results are kept)"
    )
    p.add_argument("run_id", nargs="?", help="the run (or --failed --workflow NAME)")
    p.add_argument("--from-step", metavar="KEY", help="default: the failed step, or resume")
    p.add_argument(
        "--failed", action="store_true", help="replay every failed run of --workflow instead"
    )
    _filters(p, status=False)
    p.add_argument("--limit", type=int, default=1000, help="with --failed: at most this many")
    _action_options(p)
    p.set_defaults(handler=run_replay)

    p = actions.add_parser(
        "fork", help="start a new run from a run's history before a step (the original is kept)"
    )
    p.add_argument("run_id")
    p.add_argument(
        "--from-step", metavar="KEY", help="default: the failed step, or the end of a cancelled run"
    )
    _action_options(p)
    p.set_defaults(handler=run_fork)

    p = actions.add_parser("retry", help="retry a failed run, or a waiting step, now")
    p.add_argument("run_id")
    _action_options(p)
    p.set_defaults(handler=run_retry)

    p = actions.add_parser("cancel", help="cancel a live run")
    p.add_argument("run_id")
    _action_options(p)
    p.set_defaults(handler=run_cancel)

    p = actions.add_parser(
        "prune", help="delete finished runs older than an age, in small batches (retention)"
    )
    p.add_argument("--older-than", required=True, metavar="AGE", help="finished before: 30d, 12h")
    p.add_argument(
        "--status", required=True, help="completed, failed or cancelled (live runs never)"
    )
    p.add_argument("--workflow", "-w", help="only this workflow")
    p.add_argument("--batch", type=int, default=1000, help="runs per transaction (1000)")
    _action_options(p)
    p.set_defaults(handler=run_prune)


def _filters(p: argparse.ArgumentParser, *, status: bool = True) -> None:
    p.add_argument("--workflow", "-w", help="only this workflow")
    if status:
        p.add_argument("--status", "-s", help="only this status (failed, running, ...)")
        p.add_argument("--search", "-q", help="an exact run id or idempotency key")
    p.add_argument("--since", help="created since: 30m, 6h, 2d, 1w or an ISO time")
    p.add_argument("--until", help="created before: same forms as --since")


def _action_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reason", help="kept on the run's history")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    add_connection_options(p)


def _connect(args: argparse.Namespace) -> FlowKeeper:
    # Without the signing key a push would be refused: leave runs due for the scheduler.
    return flowkeeper_for_actions(args)


def _confirm(args: argparse.Namespace, question: str) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise ConfigurationError(f"{question} Pass --yes to confirm when not at a terminal.")
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")


# output helpers -------------------------------------------------------------------------
def _colour(status: str) -> str:
    if not sys.stdout.isatty() or os.environ.get("NO_COLOR"):
        return status
    return f"\033[{_COLOURS.get(status, '0')}m{status}\033[0m"


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m" if hours < 48 else f"{hours // 24}d {hours % 24}h"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def table(headers: list[str], rows: list[list[str]], *, colour_col: int | None = None) -> str:
    """A plain text table; column widths from the content."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            padded = cell.ljust(widths[i])
            cells.append(padded.replace(cell, _colour(cell), 1) if i == colour_col else padded)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _duration(run: RunSummary) -> str:
    start = run.started_at or run.created_at
    end = run.finished_at
    return _seconds((end - start).total_seconds()) if end else "-"


# commands ---------------------------------------------------------------------------------
async def patch_list(args: argparse.Namespace) -> int:
    """``runs list --patch ID``: may the old branch of this patch be deleted yet?"""
    fk = _connect(args)
    try:
        branches = await fk.patch_branches(args.patch)
        old_runs = await fk.patch_runs(args.patch, old=True, limit=args.limit)
    finally:
        await fk.aclose()
    if args.json:
        print(
            json.dumps(
                {"branches": [b.as_json() for b in branches], "old_branch_runs": old_runs},
                indent=2,
            )
        )
        return 0
    if not branches:
        print(f"no live run has reached ctx.patched({args.patch!r})")
        return 0
    rows = [[b.workflow, str(b.old), str(b.new), str(b.unreached)] for b in branches]
    print(f"patch {args.patch}: live runs per branch")
    print(table(["WORKFLOW", "OLD BRANCH", "NEW BRANCH", "NOT THERE YET"], rows))
    old = sum(b.old for b in branches)
    if old:
        print(f"\n{old} live run(s) still on the old branch, e.g.:")
        for rid in old_runs:
            print(f"  {rid}")
    else:
        print(
            f"\nno live run is on the old branch: replace the `if ctx.patched({args.patch!r})` "
            f"with ctx.deprecate_patch({args.patch!r}) and delete the old code"
        )
    return 0


async def run_list(args: argparse.Namespace) -> int:
    if getattr(args, "patch", None):
        return await patch_list(args)
    f = RunFilter.build(
        workflow=args.workflow,
        status=args.status,
        since=args.since,
        until=args.until,
        search=args.search,
        before=args.before,
        limit=args.limit,
    )
    fk = _connect(args)
    try:
        page = await fk.list_runs(f)
    finally:
        await fk.aclose()
    if args.json:
        print(
            json.dumps(
                {
                    "runs": [r.as_json() for r in page.runs],
                    "counts": page.counts,
                    "next_before": page.next_before,
                },
                indent=2,
            )
        )
        return 0
    counts = "  ".join(f"{_colour(s)} {n}" for s, n in sorted(page.counts.items()))
    print(f"{plural(page.total, 'run')} in range   {counts}".rstrip())
    if not page.runs:
        print("no runs match")
        return 0
    # At a terminal the error column takes what is left; piped, it stays whole-ish.
    err_width = max(30, shutil.get_terminal_size().columns - 110) if sys.stdout.isatty() else 200
    rows = [
        [
            r.status.value,
            r.id,
            _clip(r.workflow, 24),
            _clip(r.idempotency_key or "", 20),
            str(r.steps),
            _when(r.created_at),
            _duration(r),
            _clip(f"{r.error_type.rsplit('.', 1)[-1]}: {r.error_message}", err_width)
            if r.error_type
            else "",
        ]
        for r in page.runs
    ]
    print(
        table(
            ["STATUS", "RUN", "WORKFLOW", "KEY", "STEPS", "CREATED", "DURATION", "ERROR"],
            rows,
            colour_col=0,
        )
    )
    if page.next_before:
        print(f"more: flowkeeper runs list ... --before {page.next_before}")
    return 0


def text_timeline(timeline: Timeline, *, width: int = 50) -> list[str]:
    """The timeline as text: one line per lane, one glyph per span kind."""
    start, end = timeline.start, timeline.end
    total = max((end - start).total_seconds(), 1e-6)
    label = min(28, max([len(lane.key) for lane in timeline.lanes] + [4]))

    def col(t: datetime) -> int:
        return min(width - 1, max(0, int((t - start).total_seconds() / total * width)))

    lines = [f"{'':<{label}}  0{' ' * (width - 1)}{_seconds(total)}"]
    for lane in timeline.lanes:
        cells = [" "] * width
        for span in lane.spans:
            glyph = _WAIT_GLYPH if span.kind == "wait" else _GLYPHS.get(span.outcome, "?")
            a, b = col(span.start), col(span.end or timeline.now)
            for i in range(a, max(a, b) + 1):
                if cells[i] == " " or glyph in "X>":  # failures and "now" stay visible
                    cells[i] = glyph
        lines.append(f"{_clip(lane.key, label):<{label}} |{''.join(cells)}| {_lane_note(lane)}")
    lines.append(
        f"{'':<{label}}  {_GLYPHS['completed']} ok  {_GLYPHS['failed']} failed attempt  "
        f"{_GLYPHS['waiting']} retry wait  {_GLYPHS['sleeping']} sleep  "
        f"{_WAIT_GLYPH} wait  {_GLYPHS['running']} executing"
    )
    return lines


def _lane_note(lane: Lane) -> str:
    attempts = sum(1 for s in lane.spans if s.kind == "attempt")
    note = _colour(lane.status)
    return f"{note} ({attempts} attempts)" if attempts > 1 else note


async def run_show(args: argparse.Namespace) -> int:
    fk = _connect(args)
    try:
        info = await fk.get_run(await resolve_run_id(fk.store, args.run_id))
        now = await fk.store.clock_now()
        waits = await fk.run_waits(info.id)
        parent = await fk.store.run_parent(info.id)
        children = await fk.store.run_children(info.id, _CHILDREN_SHOWN)
        total = await fk.store.count_children(info.id) if children else 0
        logs = await fk.run_logs(info.id) if args.logs else None
        # Why a queued run has not started, as on its dashboard page.
        queued = info.status.value == "queued"
        reason = await FlowStatus(fk.store).queued_reason(info.id) if queued else None
    finally:
        await fk.aclose()
    if args.json:
        from ..dashboard.views import run_json

        data = run_json(
            info, now, None, waits, parent=parent, children=children, children_total=total
        )
        if logs is not None:
            data["logs"] = [line.as_json() for line in logs]
        data["queued_reason"] = reason.text if reason is not None else None
        print(json.dumps(data, indent=2, default=str))
        return 0
    _print_run(
        info,
        now,
        full_tracebacks=args.traceback,
        waits=waits,
        queued_reason=reason.text if reason is not None else None,
    )
    _print_family(parent, children, total)
    if logs is not None:
        print("\n".join(log_lines(logs)))
    return 0


_CHILDREN_SHOWN = 100


def _print_family(parent: tuple[str, str | None] | None, children: list[Any], total: int) -> None:
    """The run's parent (a child run) and its children, with their statuses."""
    if parent is not None:
        step = f" (step {parent[1]})" if parent[1] else ""
        print(f"\nparent    {parent[0]}{step}")
    if not children:
        return
    counts: dict[str, int] = {}
    for c in children:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    shown = f", first {len(children)} shown" if total > len(children) else ""
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    print(f"\nchildren  {total} ({summary}{shown})")
    rows = [[str(c["id"]), c["parent_step"] or "-", c["workflow"], c["status"]] for c in children]
    print(table(["CHILD RUN", "STARTED BY", "WORKFLOW", "STATUS"], rows, colour_col=3))


def log_lines(logs: list[LogLine]) -> list[str]:
    """The run's log lines, grouped under their step (and attempt)."""
    if not logs:
        return [
            "\nlogs: none captured (records below the loggers' level are never created: "
            "e.g. logging.basicConfig(level=logging.INFO))"
        ]
    out = ["\nlogs"]
    where: tuple[str | None, int | None] | None = None
    for line in logs:
        if (line.step, line.attempt) != where:
            where = (line.step, line.attempt)
            if line.step is None:
                out.append("  (workflow)")
            else:
                out.append(f"  {line.step} (attempt {line.attempt})")
        text = line.message.replace("\n", "\n" + " " * 34)
        at = line.at.strftime("%H:%M:%S.%f")[:-3]
        out.append(f"    {at} {line.level:<8} {line.logger[:12]:<12} {text}")
    return out


def wait_rows(waits: list[WaitInfo]) -> list[list[str]]:
    """One row per wait: WAIT, WHAT, MATCH, UNTIL, OUTCOME, EVENT."""
    rows = []
    for w in waits:
        if w.kind == "token":
            what = f"approval token {w.token_name or w.key}"
        elif w.kind == "cancel":
            what = f"cancel_on {w.event}"
        else:
            what = str(w.event)
        rows.append(
            [
                w.key,
                what,
                _clip(match_text(w.match), 60) if w.match else "-",
                _when(w.timeout_at),
                w.state,
                f"#{w.event_number}" if w.event_number else "-",
            ]
        )
    return rows


def _print_run(
    info: RunInfo,
    now: datetime,
    *,
    full_tracebacks: bool,
    waits: list[WaitInfo] | None = None,
    queued_reason: str | None = None,
) -> None:
    waits = waits or []
    print(f"run       {info.id}")
    print(f"workflow  {info.workflow}")
    print(f"status    {_colour(info.status.value)}")
    if info.idempotency_key:
        print(f"key       {info.idempotency_key}")
    print(f"created   {_when(info.created_at)}")
    if queued_reason is not None:
        print(f"why       {queued_reason}")
    if info.finished_at:
        begun = info.started_at or info.created_at
        print(
            f"finished  {_when(info.finished_at)} "
            f"({_seconds((info.finished_at - begun).total_seconds())})"
        )
    current = [w for w in waits if w.kind != "cancel" and w.state == "waiting"]
    if info.status.value == "waiting" and current:
        until = f" until {_when(current[-1].timeout_at)}" if current[-1].timeout_at else ""
        print(f"waiting   for {current[-1].describe()}{until}")
    elif info.due_at:
        print(f"next      {_when(info.due_at)}")
        late = overdue_note(info.due_at, now, info.status.value)
        if late is not None:
            print(f"!         {late}")
        waiting = _deferred_by_unknown_workflow(info)
        if waiting is not None:
            print(f"deferred  {deploys.describe(waiting)}")
    print(f"input     {_clip(json.dumps(info.input), 200)}")
    if info.output is not None:
        print(f"output    {_clip(json.dumps(info.output), 200)}")
    if info.error:
        where = f" at step {info.error.get('step')}" if info.error.get("step") else ""
        print(f"error     {info.error.get('type')}{where}: {info.error.get('message')}")
    print()
    if info.steps:
        rows = [
            [
                str(s.position + 1),
                s.key,
                s.kind,
                s.status,
                str(s.attempts),
                _seconds((s.finished_at - s.started_at).total_seconds())
                if s.started_at and s.finished_at and s.kind == "step"
                else "-",
            ]
            for s in info.steps
        ]
        print(table(["#", "STEP", "KIND", "STATUS", "ATTEMPTS", "DURATION"], rows, colour_col=3))
        print()
    if waits:
        headers = ["WAIT", "WHAT", "MATCH", "UNTIL", "OUTCOME", "EVENT"]
        print(table(headers, wait_rows(waits), colour_col=4))
        print()
    timeline = build(info, now, waits)
    if timeline.lanes:
        print("\n".join(text_timeline(timeline)))
        print()
    for step in info.steps:
        for attempt in step.failed_attempts:
            print(
                f"! {step.key} attempt {attempt.attempt}: {attempt.error_type}: {attempt.message}"
            )
    if info.error and info.error.get("traceback"):
        tb = str(info.error["traceback"]).rstrip().splitlines()
        shown = tb if full_tracebacks else tb[-6:]
        print("\ntraceback" + ("" if full_tracebacks else " (last lines; --traceback for all)"))
        print("\n".join(f"  {line}" for line in shown))
    history = [e for e in info.events if e.kind not in ("attempt_failed", "attempt_lost")]
    if history:
        print("\nhistory")
        for e in history:
            if e.kind == deploys.EVENT:  # in words: which workflow, what is known, when next
                detail = deploys.describe(e.detail)
                print(f"  {_when(e.at)}  {e.kind:<16} {e.step_key or '':<16} {detail}")
                continue
            detail = json.dumps(e.detail, default=str) if e.detail else ""
            print(f"  {_when(e.at)}  {e.kind:<16} {e.step_key or '':<16} {_clip(detail, 100)}")


def _deferred_by_unknown_workflow(info: RunInfo) -> dict[str, Any] | None:
    """The latest workflow_unknown event's detail, when that is why the live run waits."""
    if info.finished_at or not info.events or info.events[-1].kind != deploys.EVENT:
        return None
    detail = info.events[-1].detail or {}
    return None if detail.get("failed") else detail


async def run_replay(args: argparse.Namespace) -> int:
    if args.failed:
        if not args.workflow or args.run_id:
            raise ConfigurationError("--failed needs --workflow NAME and no run id.")
        fk = _connect(args)
        try:
            question = f"Replay every failed run of {args.workflow!r} from its failed step?"
            if not _confirm(args, question):
                print("nothing done")
                return 1
            ids = await fk.replay_failed(
                args.workflow,
                since=args.since,
                until=args.until,
                limit=args.limit,
                reason=args.reason,
                actor="cli",
            )
        finally:
            await fk.aclose()
        print(f"replaying {plural(len(ids), 'failed run')} of {args.workflow}")
        for rid in ids:
            print(f"  {rid}")
        return 0
    if not args.run_id:
        raise ConfigurationError("Name the run to replay (or --failed --workflow NAME).")
    fk = _connect(args)
    try:
        args.run_id = await resolve_run_id(fk.store, args.run_id)
        where = f"from step {args.from_step!r}" if args.from_step else "from its failed step"
        if not _confirm(args, f"Replay run {args.run_id} {where}?"):
            print("nothing done")
            return 1
        await fk.replay(args.run_id, from_step=args.from_step, reason=args.reason, actor="cli")
        pushed = fk.dispatcher is not None
    finally:
        await fk.aclose()
    tail = "pushed to the endpoint" if pushed else "due for the next scheduler tick"
    print(f"run {args.run_id} replaying {where}; {tail}")
    return 0


async def run_fork(args: argparse.Namespace) -> int:
    fk = _connect(args)
    try:
        where = f"from step {args.from_step!r}" if args.from_step else "from its failed step"
        if not _confirm(args, f"Fork run {args.run_id} {where} into a new run?"):
            print("nothing done")
            return 1
        handle = await fk.fork(
            args.run_id, from_step=args.from_step, reason=args.reason, actor="cli"
        )
        pushed = fk.dispatcher is not None
    finally:
        await fk.aclose()
    tail = "pushed to the endpoint" if pushed else "due for the next scheduler tick"
    print(f"run {handle.run_id} forked from run {args.run_id} {where}; {tail}")
    print(f"the original is unchanged: flowkeeper runs show {handle.run_id}")
    return 0


async def run_retry(args: argparse.Namespace) -> int:
    fk = _connect(args)
    try:
        args.run_id = await resolve_run_id(fk.store, args.run_id)
        if not _confirm(args, f"Retry run {args.run_id} now?"):
            print("nothing done")
            return 1
        retried = await fk.retry(args.run_id, reason=args.reason, actor="cli")
    finally:
        await fk.aclose()
    print(f"run {args.run_id}: " + ("retrying now" if retried else "its retry is already going"))
    return 0


async def run_cancel(args: argparse.Namespace) -> int:
    fk = _connect(args)
    try:
        args.run_id = await resolve_run_id(fk.store, args.run_id)
        if not _confirm(args, f"Cancel run {args.run_id}?"):
            print("nothing done")
            return 1
        cancelled = await fk.cancel(args.run_id, reason=args.reason or "cancelled with the CLI")
    finally:
        await fk.aclose()
    if not cancelled:
        print(f"run {args.run_id} had already finished; nothing to cancel")
        return 1
    print(f"run {args.run_id} cancelled")
    return 0


async def run_prune(args: argparse.Namespace) -> int:
    from ..retention import parse_age

    age = parse_age(args.older_than)
    if args.batch < 1:
        raise ConfigurationError("--batch must be at least 1")
    fk = _connect(args)
    try:
        which = f" of {args.workflow}" if args.workflow else ""
        if not _confirm(
            args, f"Delete every {args.status} run{which} finished more than {age} ago?"
        ):
            print("nothing done")
            return 1
        deleted = await fk.pruner.prune_by_hand(
            args.status, age, workflow=args.workflow, batch=args.batch
        )
    finally:
        await fk.aclose()
    print(f"deleted {deleted} {args.status} run(s) finished more than {age} ago")
    return 0
