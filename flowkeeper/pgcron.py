"""pg_cron: dispatch due runs from inside Postgres, with no process of your own.

``flowkeeper pgcron install`` creates the objects of ``sql/pgcron.sql`` in the
flowkeeper schema and schedules ``CALL <schema>.pgcron_tick()`` with pg_cron
(``cron.schedule_in_database``, since pg_cron lives in the database named by
``cron.database_name``).  Each run of the job claims due runs with the same
lease semantics as :class:`flowkeeper.scheduler.Scheduler` and posts signed
invocations to the endpoint:

- through **pg_net** (``net.http_post``) where the server has it (Supabase):
  asynchronous, sent by pg_net's worker after the job commits; the next run
  of the job reads the responses and backs off the runs whose invocation
  failed;
- through **PL/Python** (``plpython3u``) on self-hosted servers: a few
  threads POST with a short timeout, fire-and-forget (the endpoint answers
  202 once it has claimed the run and goes on without the caller).

Either way the job holds its connection for seconds, not for as long as runs
take.  The signature is computed in SQL and byte-identical to Python's.

pg_cron 1.4 (Debian's) schedules by the minute at the finest and silently
reads a six-field schedule such as ``*/5 * * * * *`` as every five *minutes*;
second intervals (``'5 seconds'``) arrived in 1.5.  :func:`cron_schedule`
checks ``--every`` against the installed version.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from . import migrations
from .db import Database
from .dispatch import validate_endpoint
from .errors import ConfigurationError, DatabaseError
from .signing import SALT, KeyInput, check_signing_keys, normalize_keys
from .sql import validate_schema

if TYPE_CHECKING:
    import asyncpg

logger = logging.getLogger("flowkeeper")

TRANSPORTS = ("auto", "pg_net", "plpython")
_BLOCK_RE = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)
_EVERY_RE = re.compile(
    r"^\s*(\d+)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hr|hrs|hours?)\s*$", re.IGNORECASE
)
_SECONDS_RE = re.compile(r"^\s*(\d+)\s+seconds?\s*$", re.IGNORECASE)
_FIELD_RE = re.compile(r"^[0-9A-Za-z*/,\-$#?]+$")


# schedules -------------------------------------------------------------------------
def parse_version(text: str) -> tuple[int, int]:
    """``'1.4-1'`` → ``(1, 4)``: pg_cron's extversion, major and minor."""
    match = re.match(r"^\s*(\d+)\.(\d+)", text or "")
    if not match:
        return (0, 0)
    return int(match.group(1)), int(match.group(2))


def _sub_minute_refusal(asked: str, version: tuple[int, int]) -> ConfigurationError:
    v = f"{version[0]}.{version[1]}"
    return ConfigurationError(
        f"{asked}: this server's pg_cron is {v}, which schedules by the minute at the finest. "
        "Second intervals ('N seconds') arrived in pg_cron 1.5, and 1.4 silently reads a "
        "six-field schedule such as '*/5 * * * * *' as every five *minutes*. Use --every 1m "
        "(each run of the job dispatches everything that is due), upgrade pg_cron to 1.5 or "
        "later, or run `flowkeeper scheduler` on an always-on host to wake sleeps within "
        "milliseconds."
    )


def cron_schedule(
    *, every: str | None = None, schedule: str | None = None, version: tuple[int, int]
) -> str:
    """The pg_cron schedule for ``--every`` (or a checked ``--schedule``) on this version."""
    seconds_ok = version >= (1, 5)
    if schedule is not None:
        text = " ".join(schedule.split())
        if _SECONDS_RE.match(text):
            if not seconds_ok:
                raise _sub_minute_refusal(f"--schedule {schedule!r}", version)
            return _seconds_schedule(int(text.split()[0]), f"--schedule {schedule!r}")
        fields = text.split(" ")
        if text.startswith("@"):
            return text
        if len(fields) == 6:
            if not seconds_ok:
                raise _sub_minute_refusal(f"--schedule {schedule!r}", version)
            raise ConfigurationError(
                f"--schedule {schedule!r}: pg_cron has no six-field (seconds) cron syntax; "
                "write second intervals as 'N seconds' (1 to 59), e.g. --every 10s."
            )
        if len(fields) != 5 or not all(_FIELD_RE.match(f) for f in fields):
            raise ConfigurationError(
                f"--schedule {schedule!r} is not a five-field cron schedule "
                "(minute hour day-of-month month day-of-week, in GMT), e.g. '*/5 * * * *'."
            )
        return text
    match = _EVERY_RE.match(every or "1m")
    if not match:
        raise ConfigurationError(
            f"--every {every!r}: give a number and a unit, e.g. 30s, 1m, 5m, 1h."
        )
    amount, unit = int(match.group(1)), match.group(2).lower()[0]
    if amount <= 0:
        raise ConfigurationError(f"--every {every!r}: the interval must be positive.")
    seconds = amount * {"s": 1, "m": 60, "h": 3600}[unit]
    if seconds % 60:
        if not seconds_ok:
            raise _sub_minute_refusal(f"--every {every}", version)
        return _seconds_schedule(seconds, f"--every {every}")
    minutes = seconds // 60
    if minutes == 1:
        return "* * * * *"
    if minutes < 60 and 60 % minutes == 0:
        return f"*/{minutes} * * * *"
    if minutes % 60 == 0 and 24 % (minutes // 60) == 0:
        hours = minutes // 60
        return "0 * * * *" if hours == 1 else f"0 */{hours} * * *"
    raise ConfigurationError(
        f"--every {every}: cron repeats evenly only for intervals that divide an hour "
        "(1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30 minutes) or a day (1, 2, 3, 4, 6, 8, 12 hours). "
        "Pick one of those, or pass an explicit --schedule."
    )


def _seconds_schedule(seconds: int, asked: str) -> str:
    if not 1 <= seconds <= 59:
        raise ConfigurationError(
            f"{asked}: pg_cron second intervals run from 1 to 59 seconds; use minutes above that."
        )
    return f"{seconds} seconds"


# SQL --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _script() -> str:
    return resources.files("flowkeeper.sql").joinpath("pgcron.sql").read_text(encoding="utf-8")


def sql_blocks(schema: str) -> dict[str, str]:
    """The named blocks of ``sql/pgcron.sql`` with the schema spliced in."""
    validate_schema(schema)
    parts = _BLOCK_RE.split(_script())
    return {
        name: body.strip().replace("{schema}", schema)
        for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def sql_digest() -> str:
    """Which version of ``pgcron.sql`` is installed (``pgcron status`` compares)."""
    return hashlib.sha256(_script().encode()).hexdigest()[:16]


def derived_key(signing_key: KeyInput) -> bytes:
    """The key the first signing key signs with (itsdangerous' HMAC key derivation)."""
    return hmac.new(normalize_keys(signing_key)[0], SALT, hashlib.sha256).digest()


def job_name(database: str, schema: str) -> str:
    return f"flowkeeper:{database}:{schema}"


# results ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class InstalledJob:
    """What ``install`` set up."""

    job_name: str
    jobid: int
    schedule: str
    database: str
    cron_database: str
    pg_cron_version: str
    transport: str
    invoke_url: str


@dataclass(slots=True)
class PgCronStatus:
    """What ``status`` found; ``problems`` lists what needs doing, in words."""

    job_name: str
    database: str
    cron_database: str | None = None
    pg_cron_version: str | None = None
    job: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None
    recent_runs: list[dict[str, Any]] = field(default_factory=list)
    due_now: int = 0
    next_due_in: float | None = None
    failures_last_hour: int = 0
    last_failure: str | None = None
    problems: list[str] = field(default_factory=list)


# the installer ------------------------------------------------------------------------
class PgCron:
    """Install, inspect and remove the pg_cron job of one flowkeeper schema."""

    def __init__(
        self,
        database_url: str,
        schema: str = "flowkeeper",
        *,
        cron_database_url: str | None = None,
    ) -> None:
        self.db = Database(database_url)
        self.schema = validate_schema(schema)
        self.cron_database_url = cron_database_url

    @contextlib.asynccontextmanager
    async def _connections(
        self, *, need_cron: bool = True
    ) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection | None, str, str | None]]:
        """(app connection, cron connection or None, app database, cron database or None)."""
        app = await self.db.connect()
        cron: asyncpg.Connection | None = None
        try:
            database: str = await app.fetchval("SELECT current_database()")
            if self.cron_database_url:
                cron = await Database(self.cron_database_url).connect()
                cron_db: str | None = await cron.fetchval("SELECT current_database()")
            else:
                cron, cron_db = await self._find_cron(app, database)
            if cron is None and need_cron:
                major = int(await app.fetchval("SHOW server_version_num")) // 10000
                raise ConfigurationError(
                    "pg_cron is not loaded in this Postgres server. Install it (Debian/Ubuntu: "
                    f"apt-get install postgresql-{major}-cron; managed Postgres: enable pg_cron "
                    "in the provider's settings), add it to shared_preload_libraries, set "
                    "cron.database_name, and restart Postgres. Without pg_cron, drive due runs "
                    "with `flowkeeper tick` from any cron or with `flowkeeper scheduler`."
                )
            yield app, cron, database, cron_db
        finally:
            if cron is not None and cron is not app:
                await cron.close()
            await app.close()

    async def _find_cron(
        self, app: asyncpg.Connection, database: str
    ) -> tuple[asyncpg.Connection | None, str | None]:
        """A connection to the database pg_cron lives in, and its name (None: not loaded)."""
        import asyncpg

        try:
            cron_db: str | None = await app.fetchval(
                "SELECT current_setting('cron.database_name', true)"
            )
        except asyncpg.InsufficientPrivilegeError:
            # Only superusers (and pg_read_all_settings) may read pg_cron's settings.
            # The extension exists only in its own database: look here, then in
            # pg_cron's default, 'postgres'.
            if await _has_pg_cron(app):
                return app, database
            cron_db = "postgres"
            with contextlib.suppress(DatabaseError):
                other = await Database(_with_database(self.db.url, cron_db)).connect()
                if await _has_pg_cron(other):
                    return other, cron_db
                await other.close()
            raise ConfigurationError(
                "Cannot tell which database pg_cron lives in: reading cron.database_name needs "
                "a superuser or pg_read_all_settings, and pg_cron is not created here or in "
                "'postgres'. Pass --cron-database-url with the URL of that database."
            ) from None
        if cron_db is None:
            return None, None
        if cron_db == database:
            return app, cron_db
        return await Database(_with_database(self.db.url, cron_db)).connect(), cron_db

    async def install(
        self,
        *,
        endpoint: str,
        signing_key: KeyInput,
        every: str | None = None,
        schedule: str | None = None,
        via: str = "auto",
        dispatch_lease: float = 60.0,
        max_runs: int = 10_000,
        batch_size: int = 200,
        concurrency: int = 16,
        http_timeout: float = 3.0,
        time_limit: float = 50.0,
        allow_weak_secrets: bool = False,
    ) -> InstalledJob:
        """Create the SQL objects and schedule the job; safe to run again (it updates).

        A signing key under 32 characters is refused (``allow_weak_secrets=True``
        lets tests use one).
        """
        check_signing_keys(signing_key, allow_weak=allow_weak_secrets)
        if via not in TRANSPORTS:
            raise ConfigurationError(f"--via must be one of {', '.join(TRANSPORTS)}, got {via!r}")
        for name, value in (
            ("max_runs", max_runs),
            ("batch_size", batch_size),
            ("concurrency", concurrency),
        ):
            if value < 1:
                raise ConfigurationError(f"{name} must be at least 1, got {value}")
        if min(dispatch_lease, http_timeout, time_limit) <= 0:
            raise ConfigurationError("dispatch_lease, http_timeout and time_limit must be positive")
        base = validate_endpoint(endpoint)
        key = derived_key(signing_key)
        async with self._connections() as (app, cron, database, cron_db):
            assert cron is not None
            assert cron_db is not None
            version_text = await _ensure_pg_cron(cron, cron_db)
            version = parse_version(version_text)
            spec = cron_schedule(every=every, schedule=schedule, version=version)
            transport = await _choose_transport(app, database, via)
            name = job_name(database, self.schema)
            blocks = sql_blocks(self.schema)
            try:
                await migrations.migrate(app, self.schema)
                async with app.transaction():
                    await app.execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                        f"flowkeeper.pgcron:{self.schema}",
                    )
                    await app.execute(blocks["core"])
                    await app.execute(blocks[transport])
                    await app.execute(
                        f"""INSERT INTO {self.schema}.pgcron_settings
                            (invoke_url, invoke_path, signing_key, transport, dispatch_lease,
                             max_runs, batch_size, concurrency, http_timeout_ms, time_limit,
                             job_name, schedule, sql_digest)
                            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)""",
                        base + "/",
                        urlsplit(base).path.rstrip("/") + "/",
                        key,
                        transport,
                        timedelta(seconds=dispatch_lease),
                        max_runs,
                        batch_size,
                        concurrency,
                        max(1, round(http_timeout * 1000)),
                        timedelta(seconds=time_limit),
                        name,
                        spec,
                        sql_digest(),
                    )
            except _privilege_errors() as exc:
                raise ConfigurationError(
                    f"Not allowed to create flowkeeper's pg_cron objects in schema "
                    f"{self.schema!r} of database {database!r}: {exc}. Run the install as the "
                    "role that owns the schema (or a superuser)."
                ) from exc
            jobid = await _schedule(cron, cron_db, name, spec, self.schema, database, version)
        logger.info("pg_cron job %s scheduled (%s, via %s)", name, spec, transport)
        return InstalledJob(
            job_name=name,
            jobid=jobid,
            schedule=spec,
            database=database,
            cron_database=cron_db,
            pg_cron_version=version_text,
            transport=transport,
            invoke_url=base + "/",
        )

    async def uninstall(self) -> tuple[bool, bool]:
        """Unschedule the job and drop the objects: (job removed, objects dropped)."""
        async with self._connections(need_cron=False) as (app, cron, database, _):
            name = job_name(database, self.schema)
            removed = False
            if cron is not None and await _has_pg_cron(cron):
                removed = bool(
                    await cron.fetchval(
                        "SELECT bool_or(cron.unschedule(jobid)) FROM cron.job WHERE jobname = $1",
                        name,
                    )
                )
            existed = await app.fetchval(
                "SELECT to_regclass($1) IS NOT NULL", f"{self.schema}.pgcron_settings"
            )
            await app.execute(sql_blocks(self.schema)["uninstall"])
        return removed, bool(existed)

    async def status(self) -> PgCronStatus:
        """The job, its recent runs, the installed settings, and what looks wrong."""
        async with self._connections(need_cron=False) as (app, cron, database, cron_db):
            st = PgCronStatus(job_name=job_name(database, self.schema), database=database)
            st.cron_database = cron_db
            if cron is None:
                st.problems.append("pg_cron is not loaded in this server")
            elif not await _has_pg_cron(cron):
                st.problems.append(f"the pg_cron extension is not created in {cron_db!r}")
            else:
                st.pg_cron_version = await cron.fetchval(
                    "SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'"
                )
                await _read_job(cron, st)
                if st.job is None:
                    st.problems.append(
                        "no pg_cron job is scheduled: run `flowkeeper pgcron install`"
                    )
            if not await app.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{self.schema}.runs"):
                st.problems.append(
                    f"schema {self.schema!r} has no flowkeeper tables in {database!r}: "
                    "run `flowkeeper migrate` (or check --schema)"
                )
                return st
            await self._read_settings(app, st)
            due = await app.fetchrow(
                f"""SELECT count(*) FILTER (WHERE due_at <= {self.schema}.clock_now()) AS due,
                           extract(epoch FROM min(due_at) - {self.schema}.clock_now())::float8
                               AS next_in
                    FROM {self.schema}.runs WHERE due_at IS NOT NULL"""
            )
            assert due is not None
            st.due_now, st.next_due_in = int(due["due"]), due["next_in"]
            failures = await app.fetchrow(
                f"""SELECT count(*) AS n,
                           (array_agg(detail ->> 'reason' ORDER BY id DESC))[1] AS last
                    FROM {self.schema}.events
                    WHERE kind = 'dispatch_failed'
                      AND at > {self.schema}.clock_now() - interval '1 hour'"""
            )
            assert failures is not None
            st.failures_last_hour, st.last_failure = int(failures["n"]), failures["last"]
        return st

    async def _read_settings(self, app: asyncpg.Connection, st: PgCronStatus) -> None:
        import asyncpg

        if not await app.fetchval(
            "SELECT to_regclass($1) IS NOT NULL", f"{self.schema}.pgcron_settings"
        ):
            if st.job is not None:
                st.problems.append(
                    "the job exists but its SQL objects do not: run `flowkeeper pgcron install`"
                )
            return
        try:
            row = await app.fetchrow(
                f"""SELECT invoke_url, transport, dispatch_lease, max_runs, http_timeout_ms,
                           schedule, sql_digest, installed_at, installed_by, last_tick::text
                    FROM {self.schema}.pgcron_settings"""
            )
        except asyncpg.InsufficientPrivilegeError:
            st.problems.append(
                f"{self.schema}.pgcron_settings is readable only by the role that installed it"
            )
            return
        if row is None:
            return
        settings = dict(row)
        st.settings = settings
        if settings["sql_digest"] != sql_digest():
            st.problems.append(
                "the installed SQL is from another flowkeeper version: run "
                "`flowkeeper pgcron install` again"
            )
        if st.job is not None and st.job["schedule"] != settings["schedule"]:
            st.problems.append(
                f"the job's schedule ({st.job['schedule']}) differs from the installed one "
                f"({settings['schedule']}): it was changed by hand"
            )


# helpers ---------------------------------------------------------------------------------
def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def _privilege_errors() -> tuple[type[BaseException], ...]:
    import asyncpg

    return (asyncpg.InsufficientPrivilegeError,)


async def _has_pg_cron(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron')")
    )


async def _ensure_pg_cron(cron: asyncpg.Connection, cron_db: str) -> str:
    """pg_cron's extversion in its database, creating the extension if allowed."""
    import asyncpg

    version: str | None = await cron.fetchval(
        "SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'"
    )
    if version is not None:
        return version
    try:
        await cron.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
    except asyncpg.PostgresError as exc:
        raise ConfigurationError(
            f"pg_cron is loaded but its extension is not created in database {cron_db!r}, and "
            f"creating it failed ({exc}). Run CREATE EXTENSION pg_cron; in {cron_db!r} as a "
            "superuser, then install again."
        ) from exc
    created: str = await cron.fetchval(
        "SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'"
    )
    return created


async def _choose_transport(conn: asyncpg.Connection, database: str, via: str) -> str:
    """pg_net where present (or asked for), else PL/Python; create the extension if allowed."""
    import asyncpg

    has_net = await conn.fetchval(
        "SELECT to_regprocedure('net.http_post(text,jsonb,jsonb,jsonb,integer)') IS NOT NULL"
    )
    has_python = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_language WHERE lanname = 'plpython3u')"
    )
    available = {
        r["name"]
        for r in await conn.fetch(
            "SELECT name FROM pg_available_extensions WHERE name IN ('pg_net', 'plpython3u')"
        )
    }
    major = int(await conn.fetchval("SHOW server_version_num")) // 10000

    async def create(extension: str) -> str | None:
        try:
            await conn.execute(f"CREATE EXTENSION IF NOT EXISTS {extension}")
        except asyncpg.PostgresError as exc:
            return str(exc)
        return None

    if via in ("auto", "pg_net") and has_net:
        net_db = await conn.fetchval("SELECT current_setting('pg_net.database_name', true)")
        if net_db and net_db != database:
            raise ConfigurationError(
                f"pg_net sends requests only from database {net_db!r} (pg_net.database_name), "
                f"not from {database!r}: set pg_net.database_name to {database!r}, or use "
                "--via plpython."
            )
        return "pg_net"
    if via == "pg_net":
        problem = await create("pg_net") if "pg_net" in available else "not installed"
        if problem is None:
            return "pg_net"
        raise ConfigurationError(
            f"pg_net is not available in database {database!r} ({problem}). Enable it "
            "(Supabase: Dashboard → Database → Extensions → pg_net; elsewhere it must be in "
            "shared_preload_libraries, then CREATE EXTENSION pg_net), or use --via plpython."
        )
    if has_python:
        return "plpython"
    if "plpython3u" in available:
        problem = await create("plpython3u")
        if problem is None:
            return "plpython"
        raise ConfigurationError(
            f"PL/Python is installed on this server but could not be enabled in database "
            f"{database!r} ({problem}). A superuser must run CREATE EXTENSION plpython3u; "
            "there (it is an untrusted language), then run install again."
        )
    if via == "plpython":
        raise ConfigurationError(
            f"PL/Python (plpython3u) is not installed on this server. Debian/Ubuntu: apt-get "
            f"install postgresql-plpython3-{major}, then install again."
        )
    raise ConfigurationError(
        f"Neither pg_net nor PL/Python is available in database {database!r}, so pg_cron has "
        "no way to send HTTP requests. Enable one of them: pg_net (Supabase: Dashboard → "
        "Database → Extensions → pg_net) or PL/Python (Debian/Ubuntu: apt-get install "
        f"postgresql-plpython3-{major}; then CREATE EXTENSION plpython3u as a superuser). "
        "Or drive due runs without pg_cron: `flowkeeper tick` from any cron, or "
        "`flowkeeper scheduler` on an always-on host."
    )


async def _schedule(
    cron: asyncpg.Connection,
    cron_db: str,
    name: str,
    spec: str,
    schema: str,
    database: str,
    version: tuple[int, int],
) -> int:
    import asyncpg

    command = f"CALL {schema}.pgcron_tick()"
    try:
        if version >= (1, 4):
            jobid = await cron.fetchval(
                "SELECT cron.schedule_in_database($1, $2, $3, $4)", name, spec, command, database
            )
        elif cron_db == database:
            jobid = await cron.fetchval("SELECT cron.schedule($1, $2, $3)", name, spec, command)
        else:
            raise ConfigurationError(
                f"pg_cron {version[0]}.{version[1]} runs jobs only in {cron_db!r}; jobs in "
                f"another database ({database!r}) need pg_cron 1.4 or later "
                "(cron.schedule_in_database)."
            )
    except asyncpg.InsufficientPrivilegeError as exc:
        raise ConfigurationError(
            f"Not allowed to schedule pg_cron jobs ({exc}): a superuser must run GRANT USAGE "
            f"ON SCHEMA cron TO {await cron.fetchval('SELECT current_user')}; in {cron_db!r}."
        ) from exc
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"pg_cron refused the job ({spec!r}): {exc}") from exc
    return int(jobid)


async def _read_job(cron: asyncpg.Connection, st: PgCronStatus) -> None:
    row = await cron.fetchrow(
        "SELECT jobid, schedule, command, database, username, active FROM cron.job "
        "WHERE jobname = $1",
        st.job_name,
    )
    if row is None:
        return
    st.job = dict(row)
    if not row["active"]:
        st.problems.append("the pg_cron job is inactive (cron.alter_job(..., active := false))")
    has_details = await cron.fetchval("SELECT to_regclass('cron.job_run_details') IS NOT NULL")
    if not has_details:
        return
    runs = await cron.fetch(
        """SELECT status, return_message, start_time, end_time FROM cron.job_run_details
           WHERE jobid = $1 ORDER BY runid DESC LIMIT 5""",
        row["jobid"],
    )
    st.recent_runs = [dict(r) for r in runs]
    if runs and runs[0]["status"] == "failed":
        st.problems.append(f"the last run of the job failed: {runs[0]['return_message']}")
