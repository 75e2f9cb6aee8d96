"""``flowkeeper doctor``: check the whole chain a run goes through, and say what to fix.

Database reachable → schema migrated → endpoint configured → the endpoint
answers a signed probe from here (reachable, same signing key, its own
database reachable) → pg_cron, when installed, signs with the same key,
targets the same endpoint and reaches it from the database → a driver has
ticked recently → no run is overdue.  Nothing is changed: the schema is not
migrated, no run is touched (the probe names a run that cannot exist).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import health, migrations

if TYPE_CHECKING:
    from .client import FlowKeeper


@dataclass(frozen=True, slots=True)
class Check:
    """One link of the chain: ``ok``, what was found, and what to do when not ok."""

    name: str
    ok: bool
    message: str
    fix: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "message": self.message, "fix": self.fix}


def _db_url_hint(fk: FlowKeeper) -> str:
    from .db import describe

    return describe(fk.db.url)


async def run(fk: FlowKeeper, *, overdue_after: float = health.OVERDUE_AFTER) -> list[Check]:
    """Every check, in the chain's order; stops where later checks cannot mean anything."""
    checks: list[Check] = []
    where = _db_url_hint(fk)
    try:
        async with fk.db.acquire() as conn:
            await conn.fetchval("SELECT 1")
            version = await migrations.current_version(conn, fk.schema)
    except Exception as exc:  # whatever the driver raises: reported, not raised
        checks.append(
            Check(
                "database",
                False,
                f"cannot reach the database at {where}: {type(exc).__name__}: {exc}",
                "check DATABASE_URL (host, port, password, sslmode) and that Postgres is up",
            )
        )
        return checks
    checks.append(Check("database", True, f"reachable at {where}"))
    latest = migrations.latest_version()
    if version < latest:
        checks.append(
            Check(
                "schema",
                False,
                f"schema {fk.schema!r} is at version {version}, this flowkeeper needs {latest}"
                + (" (not created yet)" if version == 0 else ""),
                "run `flowkeeper migrate` (or let the app migrate on first use: auto_migrate)",
            )
        )
        return checks
    if version > latest:
        checks.append(
            Check(
                "schema",
                False,
                f"schema {fk.schema!r} is at version {version}, newer than this flowkeeper "
                f"({latest})",
                "upgrade flowkeeper where you run this command",
            )
        )
        return checks
    checks.append(Check("schema", True, f"{fk.schema!r} migrated (version {version})"))
    checks.append(await _probe(fk))
    checks.extend(await _pgcron(fk))
    state = await fk.health(overdue_after=overdue_after)
    if state.drivers:
        last = state.drivers[0]
        seen = f"last tick {health.ago(last.age)} ago by {last.kind} at {last.place}"
    else:
        seen = "no driver has ever ticked"
    fresh = state.drivers and state.drivers[0].age <= state.stale_after
    checks.append(
        Check(
            "driver",
            bool(fresh),
            seen,
            None if fresh else f"is a driver running? {health.START_A_DRIVER}",
        )
    )
    if state.overdue:
        checks.append(
            Check(
                "backlog",
                False,
                f"{state.overdue} run(s) overdue (due for more than {overdue_after:.0f}s; the "
                f"oldest for {health.ago(state.oldest_due_age or 0)})",
                state.problems[0] if state.problems else "see the checks above",
            )
        )
    else:
        checks.append(Check("backlog", True, f"{state.due} run(s) due now, none overdue"))
    return checks


async def _probe(fk: FlowKeeper) -> Check:
    from .scheduler import PROBE_RUN_ID

    if fk.dispatcher is None:
        return Check(
            "endpoint",
            False,
            "no endpoint configured: runs cannot be pushed or dispatched from here",
            "set FLOWKEEPER_ENDPOINT (or --endpoint) to the public URL where fk.asgi() is mounted",
        )
    url = fk.dispatcher.endpoint
    delivery = await fk.dispatcher.invoke(PROBE_RUN_ID, None)
    if delivery.delivered:
        return Check(
            "endpoint",
            True,
            f"{url} answered the signed probe: reachable, same signing key, its database reachable",
        )
    code, reason = delivery.status_code, delivery.reason
    if code is None:
        return Check(
            "endpoint",
            False,
            f"{url} is unreachable from here: {reason}",
            "is the app running and is FLOWKEEPER_ENDPOINT its public URL (scheme, host, port, "
            "the path where fk.asgi() is mounted)?",
        )
    if code == 401:
        return Check(
            "signing key",
            False,
            f"{url} refused the signed probe: {reason}",
            "the endpoint's FLOWKEEPER_SIGNING_KEY differs from the one used here: set the same "
            "key everywhere (to rotate, list new,old: the first signs, all verify)",
        )
    if code == 503:
        return Check(
            "endpoint",
            False,
            f"{url} answered but cannot reach its database: {reason}",
            "check the DATABASE_URL of the deployed app",
        )
    return Check("endpoint", False, f"{url}: {reason}", "check FLOWKEEPER_ENDPOINT")


async def _pgcron(fk: FlowKeeper) -> list[Check]:
    """pg_cron, when installed: same key, same endpoint, and its last tick reached it."""
    from .pgcron import derived_key

    try:
        async with fk.db.acquire() as conn:
            if not await conn.fetchval(
                "SELECT to_regclass($1) IS NOT NULL", f"{fk.schema}.pgcron_settings"
            ):
                return []
            row = await conn.fetchrow(
                f"SELECT invoke_url, signing_key, last_tick::text FROM {fk.schema}.pgcron_settings"
            )
    except Exception as exc:
        return [Check("pg_cron", False, f"cannot read pg_cron's settings: {exc}", None)]
    if row is None:
        return []
    import json

    checks: list[Check] = []
    ours = derived_key(fk.signer.keys)
    if not hmac.compare_digest(bytes(row["signing_key"]), ours):
        checks.append(
            Check(
                "pg_cron key",
                False,
                "pg_cron signs its invocations with another key than this configuration",
                "run `flowkeeper pgcron install` again with the endpoint's FLOWKEEPER_SIGNING_KEY",
            )
        )
    url = fk.dispatcher.endpoint if fk.dispatcher else None
    if url and row["invoke_url"].rstrip("/") != url.rstrip("/"):
        checks.append(
            Check(
                "pg_cron endpoint",
                False,
                f"pg_cron invokes {row['invoke_url']}, this configuration {url}",
                "run `flowkeeper pgcron install --endpoint ...` with the right URL",
            )
        )
    tick = json.loads(row["last_tick"]) if row["last_tick"] else None
    if tick and tick.get("failed") and tick.get("last_error"):
        checks.append(
            Check(
                "pg_cron reach",
                False,
                f"from the database, pg_cron's last tick could not reach {row['invoke_url']}: "
                f"{tick['last_error']}",
                "the endpoint must be reachable from the database server (a public URL, not "
                "localhost of your laptop); check its firewall and TLS",
            )
        )
    elif tick:
        checks.append(Check("pg_cron", True, f"last tick sent {tick.get('sent', 0)} invocation(s)"))
    return checks
