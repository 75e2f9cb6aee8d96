"""``flowkeeper pgcron install|uninstall|status``: a pg_cron job that dispatches due runs."""

from __future__ import annotations

import argparse
import os
from datetime import datetime
from typing import Any

from ..errors import ConfigurationError
from ..pgcron import TRANSPORTS, PgCron, PgCronStatus


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "pgcron",
        help="schedule a pg_cron job that dispatches due runs from inside Postgres",
        description="Dispatch due runs from inside Postgres with pg_cron, through pg_net "
        "(Supabase) or PL/Python (self-hosted). No process of your own needed.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    install = actions.add_parser(
        "install",
        help="create the SQL objects and schedule the job (run again to update)",
        description="Create flowkeeper's pg_cron objects in the schema and schedule "
        "`CALL <schema>.pgcron_tick()`. The endpoint and the derived signing key are stored "
        "in <schema>.pgcron_settings, readable only by the installing role.",
    )
    _connection(install)
    install.add_argument("--endpoint", help="public URL of the endpoint (FLOWKEEPER_ENDPOINT)")
    install.add_argument(
        "--signing-key", help="signing key; the first of a list signs (FLOWKEEPER_SIGNING_KEY)"
    )
    when = install.add_mutually_exclusive_group()
    when.add_argument(
        "--every",
        default=None,
        help="how often: 1m (default), 5m, 1h; seconds (10s) need pg_cron 1.5 or later",
    )
    when.add_argument("--schedule", help="an explicit pg_cron schedule, e.g. '*/2 * * * *'")
    install.add_argument(
        "--via",
        choices=TRANSPORTS,
        default="auto",
        help="how Postgres sends HTTP: pg_net where present, else PL/Python (auto)",
    )
    install.add_argument(
        "--dispatch-lease",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long a dispatched run is reserved before another tick may send it again (60)",
    )
    install.add_argument("--max-runs", type=int, default=10_000, help="per run of the job")
    install.add_argument(
        "--http-timeout",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="wait this long for the endpoint's 202 (3)",
    )
    install.add_argument(
        "--concurrency", type=int, default=16, help="PL/Python requests in flight (16)"
    )
    install.set_defaults(handler=run_install)

    uninstall = actions.add_parser("uninstall", help="unschedule the job and drop its objects")
    _connection(uninstall)
    uninstall.set_defaults(handler=run_uninstall)

    status = actions.add_parser("status", help="show the job, its last runs and any problem")
    _connection(status)
    status.set_defaults(handler=run_status)


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="Postgres URL (DATABASE_URL)")
    parser.add_argument(
        "--schema", help="flowkeeper schema (FLOWKEEPER_SCHEMA, default flowkeeper)"
    )
    parser.add_argument(
        "--cron-database-url",
        help="URL of the database pg_cron lives in (cron.database_name), when it cannot be "
        "reached by changing the database name in --database-url",
    )


def _pgcron(args: argparse.Namespace) -> PgCron:
    url = (
        args.database_url
        or os.environ.get("FLOWKEEPER_DATABASE_URL")
        or os.environ.get("DATABASE_URL")
    )
    if not url:
        raise ConfigurationError("No database configured: pass --database-url or set DATABASE_URL.")
    schema = args.schema or os.environ.get("FLOWKEEPER_SCHEMA") or "flowkeeper"
    return PgCron(url, schema, cron_database_url=args.cron_database_url)


async def run_install(args: argparse.Namespace) -> int:
    endpoint = args.endpoint or os.environ.get("FLOWKEEPER_ENDPOINT")
    if not endpoint:
        raise ConfigurationError(
            "No endpoint configured: pass --endpoint https://your.app/api/flowkeeper or set "
            "FLOWKEEPER_ENDPOINT. Postgres itself will call it, so it must be reachable from "
            "the database server."
        )
    key = args.signing_key or os.environ.get("FLOWKEEPER_SIGNING_KEY")
    if not key:
        raise ConfigurationError(
            "No signing key configured: pass --signing-key or set FLOWKEEPER_SIGNING_KEY "
            "(the same key the endpoint verifies with)."
        )
    job = await _pgcron(args).install(
        endpoint=endpoint,
        signing_key=[k for k in key.split(",") if k.strip()],
        every=args.every,
        schedule=args.schedule,
        via=args.via,
        dispatch_lease=args.dispatch_lease,
        max_runs=args.max_runs,
        http_timeout=args.http_timeout,
        concurrency=args.concurrency,
    )
    transport = "pg_net (asynchronous)" if job.transport == "pg_net" else "PL/Python"
    print(
        f"pg_cron job {job.job_name!r} (id {job.jobid}) scheduled '{job.schedule}' "
        f"in database {job.cron_database!r}, running in {job.database!r}"
    )
    print(f"  pg_cron {job.pg_cron_version}; invocations go to {job.invoke_url} via {transport}")
    print(
        f"  the endpoint and the derived signing key are stored in "
        f"{args.schema or os.environ.get('FLOWKEEPER_SCHEMA') or 'flowkeeper'}.pgcron_settings "
        "(readable only by this role)"
    )
    return 0


async def run_uninstall(args: argparse.Namespace) -> int:
    removed, dropped = await _pgcron(args).uninstall()
    print(f"job {'unscheduled' if removed else 'was not scheduled'}; ", end="")
    print("objects dropped" if dropped else "no objects were installed")
    return 0


async def run_status(args: argparse.Namespace) -> int:
    st = await _pgcron(args).status()
    _print_status(st)
    return 1 if st.problems else 0


def _print_status(st: PgCronStatus) -> None:
    print(f"job {st.job_name}")
    if st.pg_cron_version:
        print(f"  pg_cron {st.pg_cron_version} in database {st.cron_database!r}")
    if st.job:
        state = "active" if st.job["active"] else "INACTIVE"
        print(
            f"  schedule '{st.job['schedule']}' (GMT), {state}, runs in {st.job['database']!r} "
            f"as {st.job['username']!r}: {st.job['command']}"
        )
    if st.settings:
        s = st.settings
        print(
            f"  sends to {s['invoke_url']} via {s['transport']}; "
            f"installed {_when(s['installed_at'])} by {s['installed_by']}"
        )
        if s["last_tick"]:
            print(f"  last tick: {s['last_tick']}")
    for run in st.recent_runs:
        took = (
            f"{(run['end_time'] - run['start_time']).total_seconds():.3f}s"
            if run["end_time"] and run["start_time"]
            else "running"
        )
        print(f"  run {_when(run['start_time'])}: {run['status']} ({took}) {run['return_message']}")
    nxt = "-" if st.next_due_in is None else f"{st.next_due_in:.1f}s"
    print(f"  runs due now: {st.due_now}; next due in: {nxt}")
    if st.failures_last_hour:
        print(
            f"  failed dispatches recorded in the last hour: {st.failures_last_hour} "
            f"(last: {st.last_failure})"
        )
    for problem in st.problems:
        print(f"  problem: {problem}")


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip() if value else "-"
