"""pg_cron: the job that dispatches due runs from inside Postgres.

Real pg_cron (Debian postgresql-15-cron, preloaded by the test cluster) and
real PL/Python (postgresql-plpython3-15).  pg_net has no Debian package and
this machine cannot fetch it, so its path runs against ``PgNetStandIn``: the
SQL interface the job calls (``net.http_post``, the request queue and the
response table, with pg_net's documented body encoding) and a relay that
sends the queued requests over real HTTP, as pg_net's worker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from flowkeeper import ConfigurationError, Context, FlowKeeper
from flowkeeper.pgcron import PgCron, derived_key, sql_blocks
from flowkeeper.testing import FakeClock

from ..helpers import KEY, make_fk, pg_cron_available, serve, wait_for

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "signing.json").read_text())[
    "vectors"
]


def _plpython_available() -> bool:
    try:
        libdir = subprocess.run(
            ["pg_config", "--pkglibdir"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return (Path(libdir) / "plpython3.so").exists()


needs_pg_cron = pytest.mark.skipif(
    not pg_cron_available(),
    reason="pg_cron is not installed: apt-get install postgresql-15-cron (Debian package)",
)
needs_plpython = pytest.mark.skipif(
    not _plpython_available(),
    reason="PL/Python is not installed: apt-get install postgresql-plpython3-15 (Debian package)",
)


@pytest.fixture
async def pgcron(database_url: str) -> AsyncIterator[PgCron]:
    """The installer for this test's database; the job is removed afterwards."""
    installer = PgCron(database_url)
    try:
        yield installer
    finally:
        with contextlib.suppress(Exception):
            await installer.uninstall()


def _count_done(conn: asyncpg.Connection, ids: list[str]):
    async def check() -> bool:
        done = await conn.fetchval(
            "SELECT count(*) FROM flowkeeper.runs WHERE id = ANY($1::uuid[]) "
            "AND status = 'completed'",
            ids,
        )
        return done == len(ids)

    return check


async def _queued_runs(database_url: str, workflow, count: int) -> list[str]:
    """Runs triggered by a process without an endpoint: due now, nobody pushed them."""
    trigger_side = make_fk(database_url, endpoint=None)
    trigger_side.register(workflow)
    try:
        return [(await trigger_side.trigger(workflow.name, i)).run_id for i in range(count)]
    finally:
        await trigger_side.aclose()


def _double_workflow(fk: FlowKeeper):
    from flowkeeper import define_workflow

    async def double(ctx: Context, n: int) -> int:
        return await ctx.step("double", lambda: n * 2)

    wf = define_workflow("double", double)
    fk.register(wf)
    return wf


# signing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['method']} {v['path']}")
async def test_sql_signature_reproduces_the_shared_vectors(
    conn: asyncpg.Connection, vector: dict
) -> None:
    await conn.execute(sql_blocks("flowkeeper")["core"])
    header = await conn.fetchval(
        "SELECT flowkeeper.fk_sign($1, $2, $3, $4, $5)",
        vector["key"],
        vector["method"],
        vector["path"],
        vector["body"].encode(),
        vector["timestamp"],
    )
    assert header == vector["header"]
    derived = await conn.fetchval(
        "SELECT flowkeeper.fk_derive_key(convert_to($1, 'UTF8'))", vector["key"]
    )
    assert derived == derived_key(vector["key"])


async def test_sql_signature_of_a_long_key_and_a_large_body(conn: asyncpg.Connection) -> None:
    # Keys longer than SHA-256's block are hashed first (RFC 2104): a separate branch.
    from flowkeeper.signing import SIGNATURE_HEADER, sign_request

    await conn.execute(sql_blocks("flowkeeper")["core"])
    key = "k" * 100
    body = json.dumps({"run_id": "x" * 5000, "lease": None}).encode()
    expected = sign_request(key, method="POST", path="/p/", body=body, timestamp=2**33 + 7)
    header = await conn.fetchval(
        "SELECT flowkeeper.fk_sign($1, 'POST', '/p/', $2, $3)", key, body, 2**33 + 7
    )
    assert header == expected[SIGNATURE_HEADER]


# the job's command, run directly -------------------------------------------------------------
@needs_pg_cron
@needs_plpython
async def test_tick_from_postgres_dispatches_each_due_run_once(
    database_url: str, conn: asyncpg.Connection, pgcron: PgCron
) -> None:
    fk = make_fk(database_url)
    wf = _double_workflow(fk)
    arrivals: list[str] = []
    app = fk.asgi()

    async def counting(scope, receive, send):  # count invocations as they arrive
        if scope["type"] == "http" and scope["method"] == "POST":
            messages = []
            while True:
                message = await receive()
                messages.append(message)
                if not message.get("more_body"):
                    break
            body = b"".join(m.get("body", b"") for m in messages)
            arrivals.append(json.loads(body)["run_id"])
            replay = iter(messages)

            async def receive_again():
                return next(replay)

            return await app(scope, receive_again, send)
        return await app(scope, receive, send)

    try:
        ids = await _queued_runs(database_url, wf, 60)
        job = await pgcron.install(endpoint=fk.dispatcher.endpoint, signing_key=KEY, every="1m")
        assert job.transport == "plpython"
        assert job.schedule == "* * * * *"
        async with serve(fk, counting):
            started = time.monotonic()
            await conn.execute("CALL flowkeeper.pgcron_tick()")
            took = time.monotonic() - started
            await wait_for(_count_done(conn, ids), timeout=30)
        assert sorted(arrivals) == sorted(ids)  # each run posted exactly once
        assert took < 10, f"the job held its connection for {took:.1f}s"
        outputs = await conn.fetch("SELECT (output::text)::int FROM flowkeeper.runs ORDER BY 1")
        assert [r[0] for r in outputs] == [2 * i for i in range(60)]
        last = json.loads(
            await conn.fetchval("SELECT last_tick::text FROM flowkeeper.pgcron_settings")
        )
        assert last["claimed"] == 60
        assert last["sent"] == 60
        assert last["failed"] == 0
        # The command pg_cron runs names no secret.
        async with _cron_database(database_url) as cron:
            command = await cron.fetchval(
                "SELECT command FROM cron.job WHERE jobname = $1", job.job_name
            )
        assert command == "CALL flowkeeper.pgcron_tick()"
    finally:
        await fk.aclose()


@needs_pg_cron
@needs_plpython
async def test_endpoint_down_or_refusing_is_backed_off_and_recorded(
    database_url: str, conn: asyncpg.Connection, pgcron: PgCron
) -> None:
    clock = await FakeClock(conn).install()
    fk = make_fk(database_url)
    wf = _double_workflow(fk)
    try:
        ids = await _queued_runs(database_url, wf, 5)
        # Installed with a key the endpoint does not know: every invocation gets 401.
        await pgcron.install(
            endpoint=fk.dispatcher.endpoint,
            signing_key="wrong-signing-key-0123456789abcdefgh",
            every="1m",
        )
        async with serve(fk):
            await conn.execute("CALL flowkeeper.pgcron_tick()")
        rows = await conn.fetch("SELECT dispatch_failures, lease_token FROM flowkeeper.runs")
        assert [(r["dispatch_failures"], r["lease_token"]) for r in rows] == [(1, None)] * 5
        reasons = await conn.fetch(
            "SELECT detail->>'reason' AS reason, detail->>'via' AS via FROM flowkeeper.events "
            "WHERE kind = 'dispatch_failed'"
        )
        assert len(reasons) == 5
        assert all(r["reason"].startswith("HTTP 401: Invalid signature") for r in reasons)
        assert {r["via"] for r in reasons} == {"pg_cron"}

        # Backed off: an immediate second run of the job sends nothing (no spinning).
        await conn.execute("CALL flowkeeper.pgcron_tick()")
        assert await conn.fetchval("SELECT sum(dispatch_failures) FROM flowkeeper.runs") == 5

        # Endpoint gone (connection refused): still recorded, still backed off.
        await pgcron.install(endpoint=fk.dispatcher.endpoint, signing_key=KEY, every="1m")
        await clock.advance(3)  # past the first backoff (2 s +- 20 %)
        await conn.execute("CALL flowkeeper.pgcron_tick()")
        last = await conn.fetchval(
            "SELECT detail->>'reason' FROM flowkeeper.events WHERE kind = 'dispatch_failed' "
            "ORDER BY id DESC LIMIT 1"
        )
        assert "refused" in last.lower()
        assert await conn.fetchval("SELECT min(dispatch_failures) FROM flowkeeper.runs") == 2

        # The endpoint is back: the next run of the job after the backoff delivers.
        await clock.advance(6)
        async with serve(fk):
            await conn.execute("CALL flowkeeper.pgcron_tick()")
            await wait_for(_count_done(conn, ids), timeout=20)
        status = await pgcron.status()
        assert status.failures_last_hour == 10
        assert status.settings is not None
        assert status.settings["transport"] == "plpython"
    finally:
        await fk.aclose()


@needs_pg_cron
async def test_sub_minute_interval_is_refused_on_pg_cron_1_4(
    database_url: str, conn: asyncpg.Connection, pgcron: PgCron
) -> None:
    version = await _pg_cron_version(database_url)
    if version >= (1, 5):
        pytest.skip(f"this server has pg_cron {version}, which supports seconds")
    with pytest.raises(ConfigurationError, match=r"1\.4.*minute") as err:
        await pgcron.install(endpoint="http://127.0.0.1:9/api/fk", signing_key=KEY, every="10s")
    assert "every five *minutes*" in str(err.value)
    with pytest.raises(ConfigurationError, match="six-field"):
        await pgcron.install(
            endpoint="http://127.0.0.1:9/api/fk", signing_key=KEY, schedule="*/5 * * * * *"
        )
    # Refused before anything was created or scheduled.
    assert await conn.fetchval("SELECT to_regclass('flowkeeper.pgcron_settings')") is None


@needs_pg_cron
@needs_plpython
async def test_install_twice_updates_and_uninstall_removes_everything(
    database_url: str, conn: asyncpg.Connection, pgcron: PgCron
) -> None:
    first = await pgcron.install(endpoint="http://127.0.0.1:9/api/fk", signing_key=KEY)
    second = await pgcron.install(endpoint="http://127.0.0.1:9/api/fk", signing_key=KEY, every="5m")
    assert first.jobid == second.jobid
    status = await pgcron.status()
    assert status.job is not None
    assert status.job["schedule"] == "*/5 * * * *"
    assert status.problems == []
    # Only the installing role (and superusers) may read the key.
    acl = await conn.fetchval(
        "SELECT relacl::text FROM pg_class WHERE oid = 'flowkeeper.pgcron_settings'::regclass"
    )
    assert acl is None or "=r" not in acl.split("/")[0]
    assert await pgcron.uninstall() == (True, True)
    assert await pgcron.uninstall() == (False, False)
    status = await pgcron.status()
    assert status.job is None
    assert any("no pg_cron job" in p for p in status.problems)
    assert await conn.fetchval("SELECT to_regclass('flowkeeper.pgcron_settings')") is None
    leftovers = await conn.fetchval(
        "SELECT count(*) FROM pg_proc WHERE pronamespace = 'flowkeeper'::regnamespace "
        "AND (proname LIKE 'pgcron%' OR proname LIKE 'fk\\_%')"
    )
    assert leftovers == 0


@needs_pg_cron
async def test_a_role_that_may_not_enable_plpython_is_told_what_to_do(
    database_url: str, conn: asyncpg.Connection
) -> None:
    await conn.execute("DROP EXTENSION IF EXISTS plpython3u")
    database = await conn.fetchval("SELECT current_database()")
    role = f"app_{int(time.time() * 1000) % 10**8}"
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        await conn.execute(f"GRANT ALL ON SCHEMA flowkeeper TO {role}")
        await conn.execute(f"GRANT CREATE ON DATABASE {database} TO {role}")
        url = database_url.replace("postgres@", f"{role}@")
        with pytest.raises(ConfigurationError) as err:
            await PgCron(url).install(endpoint="http://127.0.0.1:9/api/fk", signing_key=KEY)
        message = str(err.value)
        assert "superuser" in message
        assert "CREATE EXTENSION" in message
    finally:
        await conn.execute(f"REVOKE ALL ON SCHEMA flowkeeper FROM {role}")
        await conn.execute(f"REVOKE ALL ON DATABASE {database} FROM {role}")
        await conn.execute(f"DROP ROLE {role}")


# the pg_net path ----------------------------------------------------------------------------
class PgNetStandIn:
    """pg_net's SQL interface in a test database, and a relay that sends its queue."""

    SQL = """
    CREATE SCHEMA net;
    CREATE TABLE net.http_request_queue (
        id bigserial PRIMARY KEY, method text NOT NULL, url text NOT NULL,
        headers jsonb NOT NULL, body bytea, timeout_milliseconds integer NOT NULL);
    CREATE TABLE net._http_response (
        id bigint, status_code integer, content_type text, headers jsonb, content text,
        timed_out boolean, error_msg text, created timestamptz NOT NULL DEFAULT now());
    CREATE FUNCTION net.http_post(
        url text, body jsonb DEFAULT '{}'::jsonb, params jsonb DEFAULT '{}'::jsonb,
        headers jsonb DEFAULT '{"Content-Type": "application/json"}'::jsonb,
        timeout_milliseconds integer DEFAULT 5000) RETURNS bigint
    LANGUAGE sql AS $$
        -- As pg_net documents: the body is sent as convert_to(body::text, 'UTF8').
        INSERT INTO net.http_request_queue (method, url, headers, body, timeout_milliseconds)
        VALUES ('POST', url, headers, convert_to(body::text, 'UTF8'), timeout_milliseconds)
        RETURNING id
    $$;
    """

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.sent = 0

    async def install(self) -> None:
        await self.conn.execute(self.SQL)

    async def relay(self) -> int:
        """Send what committed transactions queued; record each response like pg_net."""
        rows = await self.conn.fetch("DELETE FROM net.http_request_queue RETURNING *")
        async with httpx.AsyncClient() as client:
            for row in rows:
                headers = json.loads(row["headers"])
                try:
                    r = await client.post(
                        row["url"],
                        content=bytes(row["body"]),
                        headers=headers,
                        timeout=row["timeout_milliseconds"] / 1000,
                    )
                    values = (row["id"], r.status_code, r.text, False, None)
                except httpx.TimeoutException:
                    values = (row["id"], None, None, True, "Timeout was reached")
                except httpx.HTTPError as exc:
                    values = (row["id"], None, None, False, f"Couldn't connect to server: {exc}")
                await self.conn.execute(
                    "INSERT INTO net._http_response (id, status_code, content, timed_out, "
                    "error_msg) VALUES ($1, $2, $3, $4, $5)",
                    *values,
                )
        self.sent += len(rows)
        return len(rows)


@needs_pg_cron
async def test_pg_net_path_signs_the_bytes_pg_net_sends_and_reconciles_failures(
    database_url: str, conn: asyncpg.Connection, pgcron: PgCron
) -> None:
    clock = await FakeClock(conn).install()
    net = PgNetStandIn(conn)
    await net.install()
    fk = make_fk(database_url)
    wf = _double_workflow(fk)
    try:
        ids = await _queued_runs(database_url, wf, 20)
        job = await pgcron.install(endpoint=fk.dispatcher.endpoint, signing_key=KEY)
        assert job.transport == "pg_net"
        # The endpoint is down for the first run of the job.
        await conn.execute("CALL flowkeeper.pgcron_tick()")
        assert await net.relay() == 20
        assert await conn.fetchval("SELECT sum(dispatch_failures) FROM flowkeeper.runs") == 0
        await conn.execute("CALL flowkeeper.pgcron_tick()")  # reads the responses: all failed
        assert await conn.fetchval("SELECT min(dispatch_failures) FROM flowkeeper.runs") == 1
        assert await conn.fetchval("SELECT count(*) FROM flowkeeper.pgcron_requests") == 0
        assert await net.relay() == 0  # backed off: nothing sent again at once
        await clock.advance(3)
        async with serve(fk):
            await conn.execute("CALL flowkeeper.pgcron_tick()")
            assert await net.relay() == 20
            await wait_for(_count_done(conn, ids), timeout=20)
            await conn.execute("CALL flowkeeper.pgcron_tick()")  # reads 202s: nothing failed
        failures = await conn.fetchval(
            "SELECT count(*) FROM flowkeeper.events WHERE kind = 'dispatch_failed'"
        )
        assert failures == 20  # the first round only
        assert net.sent == 40
    finally:
        await fk.aclose()


# the real cron job ------------------------------------------------------------------------------
@needs_pg_cron
@needs_plpython
@pytest.mark.slow
async def test_real_pg_cron_job_wakes_a_sleeping_run(
    database_url: str, conn: asyncpg.Connection, pgcron: PgCron
) -> None:
    fk = make_fk(database_url)

    @fk.workflow("nap")
    async def nap(ctx: Context) -> str:
        await ctx.step("before", lambda: "a")
        await ctx.sleep("nap", 1)
        return await ctx.step("after", lambda: "woke")

    try:
        async with serve(fk):
            job = await pgcron.install(endpoint=fk.dispatcher.endpoint, signing_key=KEY)
            handle = await fk.trigger("nap")  # pushed: runs "before", then sleeps
            await wait_for(lambda: _status_is(conn, handle.run_id, "sleeping"), timeout=10)
            # Nothing in this process ticks: only pg_cron can wake the run.
            await wait_for(lambda: _status_is(conn, handle.run_id, "completed"), timeout=75)
        assert await fk.result(handle.run_id) == "woke"
        async with _cron_database(database_url) as cron:
            runs = await cron.fetch(
                "SELECT d.status, d.return_message FROM cron.job_run_details d "
                "JOIN cron.job j USING (jobid) WHERE j.jobname = $1",
                job.job_name,
            )
        assert runs
        assert {r["status"] for r in runs} == {"succeeded"}
        status = await pgcron.status()
        assert status.recent_runs
        assert status.problems == []
    finally:
        await fk.aclose()


async def _status_is(conn: asyncpg.Connection, run_id: str, status: str) -> bool:
    return await conn.fetchval("SELECT status FROM flowkeeper.runs WHERE id = $1", run_id) == status


@contextlib.asynccontextmanager
async def _cron_database(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The database pg_cron lives in (cron.database_name = 'postgres' in the test cluster)."""
    admin = await asyncpg.connect(database_url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
        yield admin
    finally:
        await admin.close()


async def _pg_cron_version(database_url: str) -> tuple[int, int]:
    from flowkeeper.pgcron import parse_version

    async with _cron_database(database_url) as cron:
        return parse_version(
            await cron.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'")
        )


# the command line ------------------------------------------------------------------------------
@needs_pg_cron
@needs_plpython
async def test_cli_install_status_uninstall(database_url: str, pgcron: PgCron) -> None:
    from .test_scheduler import _cli

    env = {
        "DATABASE_URL": database_url,
        "FLOWKEEPER_SIGNING_KEY": KEY,
        "FLOWKEEPER_ENDPOINT": "http://127.0.0.1:9/api/flowkeeper",
    }
    refused = await asyncio.to_thread(_cli, "pgcron", "install", "--every", "10s", env=env)
    assert refused.returncode == 1
    assert "by the minute" in refused.stderr
    installed = await asyncio.to_thread(_cli, "pgcron", "install", "--every", "2m", env=env)
    assert installed.returncode == 0, installed.stderr
    assert "scheduled '*/2 * * * *'" in installed.stdout
    assert "via PL/Python" in installed.stdout
    status = await asyncio.to_thread(_cli, "pgcron", "status", env=env)
    assert status.returncode == 0, status.stdout
    assert "schedule '*/2 * * * *' (GMT), active" in status.stdout
    assert "sends to http://127.0.0.1:9/api/flowkeeper/ via plpython" in status.stdout
    removed = await asyncio.to_thread(_cli, "pgcron", "uninstall", env=env)
    assert removed.returncode == 0
    assert "job unscheduled; objects dropped" in removed.stdout
    status = await asyncio.to_thread(_cli, "pgcron", "status", env=env)
    assert status.returncode == 1  # problems found
    assert "problem: no pg_cron job is scheduled" in status.stdout


class _ServerWithout:
    """What the catalogs of a server without pg_net and PL/Python answer.

    Both are installed on this machine, so this case cannot be made real here.
    """

    def __init__(self, available: set[str]) -> None:
        self.available = available

    async def fetchval(self, query: str, *args: object) -> object:
        if "server_version_num" in query:
            return "150004"
        return None if "pg_net.database_name" in query else False

    async def fetch(self, query: str, *args: object) -> list[dict[str, str]]:
        return [{"name": name} for name in sorted(self.available)]

    async def execute(self, query: str, *args: object) -> str:
        raise asyncpg.InsufficientPrivilegeError("permission denied to create extension")


async def test_install_names_the_extension_to_enable_when_neither_is_there() -> None:
    from flowkeeper.pgcron import _choose_transport

    with pytest.raises(ConfigurationError) as err:
        await _choose_transport(_ServerWithout(set()), "shop", "auto")  # type: ignore[arg-type]
    message = str(err.value)
    assert "Neither pg_net nor PL/Python" in message
    assert "CREATE EXTENSION plpython3u" in message
    assert "postgresql-plpython3-15" in message
    assert "pg_net" in message
    with pytest.raises(ConfigurationError, match="Supabase"):
        await _choose_transport(_ServerWithout(set()), "shop", "pg_net")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="superuser must run CREATE EXTENSION"):
        await _choose_transport(_ServerWithout({"plpython3u"}), "shop", "auto")  # type: ignore[arg-type]


@needs_pg_cron
@needs_plpython
async def test_job_asks_the_endpoint_to_retry_undelivered_failure_alerts(
    database_url: str, conn: asyncpg.Connection, pgcron: PgCron
) -> None:
    from .test_alerts import Receiver

    receiver = Receiver()
    fk = make_fk(database_url, alert_webhook=receiver.url)

    @fk.workflow("doomed")
    async def doomed(ctx: Context) -> None:
        await ctx.step("charge", _declined)

    try:
        await pgcron.install(endpoint=fk.dispatcher.endpoint, signing_key=KEY)
        async with serve(fk):
            run_id = (await fk.trigger("doomed")).run_id  # the webhook is down: not delivered
            await wait_for(lambda: _alert_tried(conn, run_id))
            assert receiver.received == []
            await conn.execute("UPDATE flowkeeper.alerts SET due_at = now()")  # skip the backoff
            async with receiver.serve():
                await conn.execute("CALL flowkeeper.pgcron_tick()")
                await wait_for(lambda: _alert_delivered(conn, run_id))
        assert [a["run_id"] for a in receiver.received] == [run_id]
    finally:
        await fk.aclose()


def _declined() -> None:
    from flowkeeper import NonRetriableError

    raise NonRetriableError("card declined")


async def _alert_tried(conn: asyncpg.Connection, run_id: str) -> bool:
    # The failed first attempt is recorded (its backoff set), not merely claimed.
    error = await conn.fetchval(
        "SELECT last_error FROM flowkeeper.alerts WHERE run_id = $1::uuid", run_id
    )
    return error is not None


async def _alert_delivered(conn: asyncpg.Connection, run_id: str) -> bool:
    outcome = await conn.fetchval(
        "SELECT outcome FROM flowkeeper.alerts WHERE run_id = $1::uuid", run_id
    )
    return outcome == "delivered"


@needs_pg_cron
@needs_plpython
async def test_the_job_resumes_wait_and_token_timeouts(
    database_url: str, conn: asyncpg.Connection, pgcron: PgCron
) -> None:
    """Waits and tokens time out through the pg_cron path like sleeps: their due time."""
    clock = await FakeClock(conn).install()
    fk = make_fk(database_url)

    @fk.workflow("waits-a-day")
    async def waits_a_day(ctx: Context) -> str:
        event = await ctx.wait_for_event("w", event="never.sent", timeout=timedelta(days=1))
        token = await ctx.create_token("ok", timeout=timedelta(hours=2))
        decision = await ctx.wait_for_token(token)
        return f"{event} {decision}"

    try:
        await pgcron.install(endpoint=fk.dispatcher.endpoint, signing_key=KEY)
        async with serve(fk):
            handle = await fk.trigger("waits-a-day")

            async def status_is(expected: str) -> bool:
                return (await fk.get_run(handle.run_id)).status.value == expected

            await wait_for(lambda: status_is("waiting"))
            await clock.advance(timedelta(days=1, seconds=1))
            await conn.execute("CALL flowkeeper.pgcron_tick()")
            await wait_for(
                lambda: _steps_of(fk, handle.run_id, {"w": "timed_out", "approval:ok": "waiting"})
            )
            await clock.advance(timedelta(hours=2, seconds=1))
            await conn.execute("CALL flowkeeper.pgcron_tick()")
            assert await fk.result(handle.run_id, timeout=20) == "None None"
    finally:
        await fk.aclose()


async def _steps_of(fk: FlowKeeper, run_id: str, expected: dict[str, str]) -> bool:
    steps = {s.key: s.status for s in (await fk.get_run(run_id)).steps}
    return all(steps.get(k) == v for k, v in expected.items())
