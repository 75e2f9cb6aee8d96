"""Scheduler figures: claim cost at 1,000,000 live runs, wake-up lateness, NOTIFY's cost.

    .venv/bin/python bench/scheduler.py                 # everything (about 3 minutes)
    .venv/bin/python bench/scheduler.py --only claim    # or: wake, notify, pgcron

claim   the runs table holds 10,000 due runs alone, then 1,000,000 sleeping runs
        plus the same 10,000 due ones (filled with generate_series, not the API).
        Ticks claim the 10,000 in batches of 200 (the Python scheduler's claim_due,
        nothing dispatched); reported: total claim time, median per batch, and the
        ratio between the two tables (targets: < 1 s in total, ratio <= 1.2).
wake    `flowkeeper scheduler` (the CLI, a subprocess) and the endpoint (uvicorn, a
        subprocess); 1,000 runs each sleep 2 s. Lateness = when the step after the
        sleep started minus the sleep's wake time (target: p99 <= 100 ms).
notify  three-step workflows per second, pushed by trigger, with and without the
        due-run NOTIFY trigger of migration 0002 (it must not slow the hot path), and
        the cost of one step write (the engine's commit query) both ways.
pgcron  how long the pg_cron job's command (PL/Python transport) holds its
        connection while it dispatches 2,000 due runs to the endpoint.

Runs on a private PostgreSQL with default durability (fsync on), or on
BENCH_DATABASE_URL (a server you give it; its databases are created and dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402

from flowkeeper import Context, FlowKeeper  # noqa: E402
from flowkeeper.db import Database  # noqa: E402
from flowkeeper.migrations import migrate  # noqa: E402
from flowkeeper.store import Store  # noqa: E402
from flowkeeper.testing import PostgresCluster  # noqa: E402
from flowkeeper.testing.postgres import free_port  # noqa: E402

KEY = "bench-signing-key-0123456789abcdef"
COMMAND = "python bench/scheduler.py " + " ".join(sys.argv[1:])


# the app the endpoint subprocess serves (uvicorn --factory scheduler:make_app) --------
def make_app() -> object:
    fk = FlowKeeper(pool_size=int(os.environ.get("BENCH_POOL", "10")))

    @fk.workflow("nap")
    async def nap(ctx: Context, n: int) -> int:
        await ctx.step("before", _identity, n)
        await ctx.sleep("nap", float(os.environ.get("BENCH_SLEEP", "2")))
        return await ctx.step("after", _identity, n)

    @fk.workflow("three")
    async def three(ctx: Context, n: int) -> int:
        a = await ctx.step("one", _identity, n)
        b = await ctx.step("two", _identity, a)
        return await ctx.step("three", _identity, b)

    return ArrivalClock(fk.asgi())


class ArrivalClock:
    """Notes when each invocation arrives (wall clock), served at GET /bench/arrivals."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.arrivals: dict[str, list[float]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/bench/arrivals":
            return await JSONResponse(self.arrivals)(scope, receive, send)
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].endswith("tick"):
            return await self.app(scope, receive, send)
        arrived = time.time()
        messages = [await receive()]
        while messages[-1].get("more_body"):
            messages.append(await receive())
        body = b"".join(m.get("body", b"") for m in messages)
        self.arrivals.setdefault(json.loads(body)["run_id"], []).append(arrived)
        replay = iter(messages)

        async def receive_again() -> Any:
            return next(replay)

        return await self.app(scope, receive_again, send)


async def _identity(n: int) -> int:
    return n


# plumbing ---------------------------------------------------------------------------
@contextmanager
def server() -> Iterator[str]:
    """A private durable cluster (or BENCH_DATABASE_URL); yields an admin URL."""
    url = os.environ.get("BENCH_DATABASE_URL")
    if url:
        yield url
        return
    # pg_cron preloaded where installed, for the pgcron section.
    libdir = subprocess.run(
        ["pg_config", "--pkglibdir"], capture_output=True, text=True, check=False
    ).stdout.strip()
    preload = ["pg_cron"] if (Path(libdir) / "pg_cron.so").exists() else []
    settings = {"max_connections": "300", "cron.database_name": "'postgres'"}
    cluster = PostgresCluster(durable=True, settings=settings, preload=preload)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


async def fresh_database(admin_url: str, name: str) -> str:
    """A migrated database of its own for one section (the previous sections' dropped)."""
    conn = await asyncpg.connect(admin_url)
    try:
        for old in await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'bench_%'"):
            await conn.execute(f"DROP DATABASE {old['datname']} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
        # Flush what earlier sections wrote now, not in the middle of this one.
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, "flowkeeper")
    finally:
        await conn.close()
    return url


@contextmanager
def subprocess_app(database_url: str, **env: str) -> Iterator[str]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/api/flowkeeper"
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "--app-dir", str(ROOT / "bench"),
         "scheduler:make_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        env={**os.environ, **env, "DATABASE_URL": database_url, "FLOWKEEPER_SIGNING_KEY": KEY,
             "FLOWKEEPER_ENDPOINT": endpoint, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint + "/", timeout=0.5)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the endpoint did not start") from None
                time.sleep(0.05)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=15)


async def until_completed(
    conn: asyncpg.Connection, limit: float, fk: FlowKeeper | None = None
) -> None:
    """Wait for every run to complete; with ``fk``, tick now and then.

    Where no scheduler runs, a push that did not get through (a saturated
    endpoint) leaves its run due: the tick sends it, as in production.
    """
    give_up = time.perf_counter() + limit
    next_tick = time.perf_counter() + 2
    while True:
        left = await conn.fetchval(
            "SELECT count(*) FROM flowkeeper.runs WHERE status <> 'completed'"
        )
        if not left:
            return
        now = time.perf_counter()
        if now > give_up:
            raise RuntimeError(f"{left} runs did not complete within {limit:.0f} s")
        if fk is not None and now > next_tick:
            await fk.tick()
            next_tick = now + 2
        await asyncio.sleep(0.02)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# claim --------------------------------------------------------------------------------
async def claim_all(store: Store, batch: int) -> list[float]:
    """Claim every due run in batches; return each claim's seconds."""
    times = []
    while True:
        started = time.perf_counter()
        rows = await store.claim_due(batch, timedelta(seconds=30))
        times.append(time.perf_counter() - started)
        if len(rows) < batch:
            return times


async def claim_rounds(url: str, due: int, batch: int, rounds: int) -> tuple[float, float]:
    """Median over rounds of (total claim seconds, median seconds per batch)."""
    db = Database(url)
    store = Store(db, "flowkeeper")
    conn = await asyncpg.connect(url)
    totals, medians = [], []
    try:
        for _ in range(rounds + 1):  # the first round warms the cache and is not counted
            await conn.execute(
                """UPDATE flowkeeper.runs SET lease_token = NULL,
                          due_at = now() - random() * interval '1 minute'
                   WHERE status = 'queued'"""
            )
            await conn.execute("VACUUM ANALYZE flowkeeper.runs")
            times = await claim_all(store, batch)
            claimed = await conn.fetchval(
                "SELECT count(*) FROM flowkeeper.runs WHERE status = 'queued' "
                "AND lease_token IS NOT NULL"
            )
            assert claimed == due, (claimed, due)
            totals.append(sum(times))
            medians.append(statistics.median(times))
    finally:
        await conn.close()
        await db.close()
    return statistics.median(totals[1:]), statistics.median(medians[1:])


async def bench_claim(admin_url: str, live: int, due: int, batch: int, rounds: int) -> None:
    print(f"\n== claim: {due:,} due runs, batches of {batch}, {rounds} rounds (medians)")
    results = {}
    for label, sleeping in (("due only", 0), ("+ sleeping", live)):
        url = await fresh_database(admin_url, "bench_claim")
        conn = await asyncpg.connect(url)
        try:
            started = time.perf_counter()
            # A bulk load, not the API: the NOTIFY trigger is for single writes.
            await conn.execute("ALTER TABLE flowkeeper.runs DISABLE TRIGGER runs_notify_due")
            await conn.execute(
                """INSERT INTO flowkeeper.runs (id, workflow, status, input, due_at)
                   SELECT gen_random_uuid(), 'nap', 'sleeping', 'null',
                          now() + interval '1 hour' + random() * interval '7 days'
                   FROM generate_series(1, $1)""",
                sleeping,
            )
            await conn.execute(
                """INSERT INTO flowkeeper.runs (id, workflow, status, input, due_at)
                   SELECT gen_random_uuid(), 'nap', 'queued', 'null', now()
                   FROM generate_series(1, $1)""",
                due,
            )
            await conn.execute("ALTER TABLE flowkeeper.runs ENABLE TRIGGER runs_notify_due")
            await conn.execute("VACUUM ANALYZE flowkeeper.runs")
            live_now = await conn.fetchval(
                "SELECT count(*) FROM flowkeeper.runs WHERE due_at IS NOT NULL"
            )
            fill = time.perf_counter() - started
        finally:
            await conn.close()
        total, per_batch = await claim_rounds(url, due, batch, rounds)
        results[label] = (total, per_batch)
        print(
            f"  {label:<11} {live_now:>9,} live runs (filled in {fill:5.1f}s): claiming "
            f"{due:,} took {total * 1000:7.1f} ms in total, {per_batch * 1000:5.2f} ms per batch"
        )
    ratio = results["+ sleeping"][1] / results["due only"][1]
    total_ratio = results["+ sleeping"][0] / results["due only"][0]
    print(
        f"  claim cost with {live + due:,} vs {due:,} live runs: x{ratio:.2f} per batch, "
        f"x{total_ratio:.2f} in total (target <= 1.2); "
        f"claim time for {due:,} at {live + due:,} live: {results['+ sleeping'][0]:.3f} s "
        "(target < 1 s)"
    )


# wake ---------------------------------------------------------------------------------
async def bench_wake(admin_url: str, sleeps: int, rate: float) -> None:
    print(
        f"\n== wake: {sleeps:,} runs sleep 2 s each, triggered at {rate:.0f}/s; "
        "`flowkeeper scheduler` wakes them"
    )
    url = await fresh_database(admin_url, "bench_wake")
    with subprocess_app(url) as endpoint:
        scheduler = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; from flowkeeper.cli import main; sys.exit(main())",
            "scheduler",
            env={**os.environ, "DATABASE_URL": url, "FLOWKEEPER_SIGNING_KEY": KEY,
                 "FLOWKEEPER_ENDPOINT": endpoint, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        fk = FlowKeeper(url, KEY, endpoint, pool_size=10)
        conn = await asyncpg.connect(url)
        try:
            await asyncio.sleep(1.0)  # the scheduler is listening
            from flowkeeper import define_workflow

            fk.register(define_workflow("nap", _nap_signature))
            started = time.perf_counter()

            async def one(i: int) -> None:
                await asyncio.sleep(i / rate)
                await fk.trigger("nap", i)

            await asyncio.gather(*(one(i) for i in range(sleeps)))
            triggered = time.perf_counter() - started
            await until_completed(conn, 120)
            rows = await conn.fetch(
                """SELECT run_id::text AS run_id,
                          extract(epoch FROM s.wake_at)::float8 AS wake,
                          extract(epoch FROM a.started_at)::float8 AS resumed
                   FROM flowkeeper.steps s JOIN flowkeeper.steps a USING (run_id)
                   WHERE s.kind = 'sleep' AND a.key = 'after'"""
            )
            async with httpx.AsyncClient() as client:
                response = await client.get(endpoint.rsplit("/api/", 1)[0] + "/bench/arrivals")
            arrivals = response.json()
        finally:
            await conn.close()
            await fk.aclose()
            scheduler.terminate()
            await asyncio.wait_for(scheduler.wait(), 15)
    assert len(rows) == sleeps
    dispatched = [
        (min(t for t in arrivals[r["run_id"]] if t >= r["wake"] - 0.5) - r["wake"]) * 1000
        for r in rows
    ]
    resumed = [(r["resumed"] - r["wake"]) * 1000 for r in rows]
    for label, late in (("invocation arrived", dispatched), ("next step started", resumed)):
        print(
            f"  {label:<18} ms after the wake time: p50 {pct(late, 0.5):6.1f}, "
            f"p90 {pct(late, 0.9):6.1f}, p99 {pct(late, 0.99):6.1f}, max {max(late):6.1f}, "
            f"min {min(late):5.1f}"
        )
    print(f"  (triggered in {triggered:.1f}s; target: p99 <= 100 ms)")


async def _nap_signature(ctx: Context, n: int) -> int:  # the trigger side validates input only
    raise AssertionError("runs execute in the endpoint subprocess")


# notify -------------------------------------------------------------------------------
async def bench_notify(admin_url: str, workflows: int, rounds: int) -> None:
    print(f"\n== notify: {workflows:,} three-step workflows per round, {rounds} rounds each way")
    url = await fresh_database(admin_url, "bench_notify")
    from flowkeeper import define_workflow

    rates: dict[bool, list[float]] = {True: [], False: []}
    semaphore = asyncio.Semaphore(32)

    async def one(n: int) -> None:
        async with semaphore:
            await fk.trigger("three", n)

    with subprocess_app(url) as endpoint:
        fk = FlowKeeper(url, KEY, endpoint, pool_size=10)
        fk.register(define_workflow("three", _three_signature))
        conn = await asyncpg.connect(url)
        try:
            for i in range(rounds * 2 + 1):
                enabled = i % 2 == 1
                await conn.execute("TRUNCATE flowkeeper.runs CASCADE")
                await conn.execute(
                    f"ALTER TABLE flowkeeper.runs {'ENABLE' if enabled else 'DISABLE'} "
                    "TRIGGER runs_notify_due"
                )
                started = time.perf_counter()
                await asyncio.gather(*(one(n) for n in range(workflows)))
                await until_completed(conn, 120, fk)
                if i:  # the first round warms up and is not counted
                    rates[enabled].append(workflows / (time.perf_counter() - started))
        finally:
            await conn.execute("ALTER TABLE flowkeeper.runs ENABLE TRIGGER runs_notify_due")
            await conn.close()
            await fk.aclose()
    with_trigger, without = statistics.median(rates[True]), statistics.median(rates[False])
    print(
        f"  workflows/s: {without:.0f} without the trigger, {with_trigger:.0f} with it "
        f"(x{with_trigger / without:.2f}); rounds with {[round(r) for r in rates[True]]}, "
        f"without {[round(r) for r in rates[False]]}"
    )
    await bench_commit_statement(url, rounds=10)


async def bench_commit_statement(url: str, rounds: int, writes: int = 2000) -> None:
    """The step write itself (the engine's commit query, lease held), with and without."""
    from flowkeeper.sql import load_queries

    commit = load_queries("flowkeeper")["commit"]
    conn = await asyncpg.connect(url)
    micros: dict[bool, list[float]] = {True: [], False: []}
    try:
        await conn.execute("TRUNCATE flowkeeper.runs CASCADE")
        ids = await conn.fetch(
            """INSERT INTO flowkeeper.runs (id, workflow, status, lease_token, due_at)
               SELECT gen_random_uuid(), 'three', 'running', gen_random_uuid(),
                      now() + interval '30 seconds'
               FROM generate_series(1, $1) RETURNING id, lease_token""",
            writes,
        )
        statement = await conn.prepare(commit)
        for i in range(rounds * 2 + 1):
            enabled = i % 2 == 1
            await conn.execute(
                f"ALTER TABLE flowkeeper.runs {'ENABLE' if enabled else 'DISABLE'} "
                "TRIGGER runs_notify_due"
            )
            started = time.perf_counter()
            for row in ids:
                token = row["lease_token"]
                await statement.fetchrow(
                    row["id"], token, "running", token, timedelta(seconds=30),
                    None, None, None, None, 0, "[]", "[]",
                )  # fmt: skip
            if i:
                micros[enabled].append((time.perf_counter() - started) / writes * 1e6)
    finally:
        await conn.execute("ALTER TABLE flowkeeper.runs ENABLE TRIGGER runs_notify_due")
        await conn.close()
    with_trigger, without = statistics.median(micros[True]), statistics.median(micros[False])
    print(
        f"  one step write (the commit query, {writes:,} per round, {rounds} rounds each way): "
        f"{without:.0f} us without the trigger, {with_trigger:.0f} us with it "
        f"(x{with_trigger / without:.2f})"
    )


async def _three_signature(ctx: Context, n: int) -> int:
    raise AssertionError("runs execute in the endpoint subprocess")


# pgcron -------------------------------------------------------------------------------
async def bench_pgcron(admin_url: str, due: int, rounds: int) -> None:
    """How long the pg_cron job's command holds its connection for ``due`` runs."""
    from flowkeeper.pgcron import PgCron

    print(f"\n== pgcron: CALL flowkeeper.pgcron_tick() over {due:,} due runs (PL/Python)")
    url = await fresh_database(admin_url, "bench_pgcron")
    with subprocess_app(url) as endpoint:
        pgcron = PgCron(url)
        await pgcron.install(endpoint=endpoint, signing_key=KEY)
        conn = await asyncpg.connect(url)
        took = []
        try:
            for _ in range(rounds):
                await conn.execute("TRUNCATE flowkeeper.runs CASCADE")
                await conn.execute(
                    """INSERT INTO flowkeeper.runs (id, workflow, status, input, due_at)
                       SELECT gen_random_uuid(), 'three', 'queued', to_jsonb(i), now()
                       FROM generate_series(1, $1) AS i""",
                    due,
                )
                started = time.perf_counter()
                await conn.execute("CALL flowkeeper.pgcron_tick()")
                took.append(time.perf_counter() - started)
                await until_completed(conn, 120)
            last = await conn.fetchval("SELECT last_tick::text FROM flowkeeper.pgcron_settings")
        finally:
            await conn.close()
            await pgcron.uninstall()
    print(
        f"  the job's command took {statistics.median(took):.2f} s (median of {rounds}; "
        f"runs: {[round(t, 2) for t in took]}); last tick: {last}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["claim", "wake", "notify", "pgcron"])
    parser.add_argument("--live", type=int, default=1_000_000, help="sleeping runs (1,000,000)")
    parser.add_argument("--due", type=int, default=10_000, help="due runs (10,000)")
    parser.add_argument("--batch", type=int, default=200, help="runs per claim (200)")
    parser.add_argument("--sleeps", type=int, default=1_000, help="runs that sleep 2 s (1,000)")
    parser.add_argument(
        "--rate", type=float, default=200.0, help="sleeping runs triggered per second (200)"
    )
    parser.add_argument("--workflows", type=int, default=1_000, help="per notify round (1,000)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"$ {COMMAND.strip()}")
    print(f"  {os.cpu_count()} cores; PostgreSQL with fsync on; Python {sys.version.split()[0]}")
    with server() as admin_url:
        if args.only in (None, "claim"):
            await bench_claim(admin_url, args.live, args.due, args.batch, args.rounds)
        if args.only in (None, "wake"):
            await bench_wake(admin_url, args.sleeps, args.rate)
        if args.only in (None, "notify"):
            await bench_notify(admin_url, args.workflows, args.rounds)
        if args.only in (None, "pgcron"):
            await bench_pgcron(admin_url, 2_000, 3)


if __name__ == "__main__":
    asyncio.run(main())
