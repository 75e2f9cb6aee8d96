"""Dashboard response times, and what its indexes cost the trigger path.

    .venv/bin/python bench/dashboard.py     # on a private PostgreSQL (system binaries)
    DATABASE_URL=postgresql://... .venv/bin/python bench/dashboard.py   # a scratch database

1. Fills ``runs`` with 100,000 runs (five workflows, realistic status mix,
   spread over 30 days, UUIDv7 ids) and one run of 300 steps, then times the
   dashboard over real HTTP (uvicorn on 127.0.0.1, signed-in session): the
   runs list unfiltered and with each filter, a deep page, and the 300-step
   run page and its JSON.  Target: every median under 150 ms.
2. Times ``fk.trigger`` (insert only, no endpoint) with and without the two
   list indexes of migration 0002, to show what they cost a write.

Prints medians and p95 over repeated requests; numbers are noisy on a shared
2-core machine, so compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowkeeper import Context, FlowKeeper
from flowkeeper.testing import PostgresCluster
from flowkeeper.testing.postgres import free_port

PASSWORD = "bench-password"
WORKFLOWS = ["checkout", "send-email", "sync-crm", "resize-image", "ai-summary"]
STATUSES = [
    ("completed", 0.90),
    ("failed", 0.05),
    ("cancelled", 0.01),
    ("running", 0.02),
    ("sleeping", 0.01),
    ("retrying", 0.01),
]


def uuid7_at(when: datetime) -> uuid.UUID:
    ms = int(when.timestamp() * 1000)
    rand = random.getrandbits(74)
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62 | (rand & ((1 << 62) - 1))
    return uuid.UUID(int=value)


async def fill(conn: asyncpg.Connection, n: int) -> tuple[str, str]:
    """n runs plus one 300-step run; returns (an idempotency key, the 300-step run id)."""
    now = datetime.now(UTC)
    names, weights = zip(*STATUSES, strict=True)
    records = []
    key = ""
    for i in range(n):
        created = now - timedelta(seconds=random.uniform(0, 30 * 86400))
        status = random.choices(names, weights)[0]
        finished = status in ("completed", "failed", "cancelled")
        error = (
            json.dumps({"type": "ConnectionError", "message": "upstream timed out", "step": "call"})
            if status == "failed"
            else None
        )
        idem = f"order-{i}" if i % 2 == 0 else None
        key = idem or key
        records.append(
            (
                uuid7_at(created),
                random.choice(WORKFLOWS),
                status,
                json.dumps({"n": i}),
                error,
                idem,
                None if finished else created + timedelta(minutes=5),
                created,
                created + timedelta(seconds=1),
                created,
                created + timedelta(seconds=1) if finished else None,
            )
        )
    records.sort(key=lambda r: r[0])
    await conn.copy_records_to_table(
        "runs",
        schema_name="flowkeeper",
        columns=[
            "id",
            "workflow",
            "status",
            "input",
            "error",
            "idempotency_key",
            "due_at",
            "created_at",
            "updated_at",
            "started_at",
            "finished_at",
        ],
        records=records,
    )
    # One long run: 300 steps, a tenth of them retried once.
    start = now - timedelta(minutes=10)
    rid = uuid7_at(start)
    await conn.execute(
        "INSERT INTO flowkeeper.runs (id, workflow, status, input, output, created_at, "
        "updated_at, started_at, finished_at) VALUES ($1, 'ai-summary', 'completed', "
        "'{\"doc\": 1}', '\"done\"', $2, $3, $2, $3)",
        rid,
        start,
        start + timedelta(seconds=300),
    )
    steps, events = [], []
    for i in range(300):
        t = start + timedelta(seconds=i)
        steps.append(
            (
                rid,
                f"chunk#{i + 1}" if i else "chunk",
                i,
                "chunk",
                "step",
                "completed",
                json.dumps({"args": [{"chunk": i, "text": "lorem ipsum " * 10}], "kwargs": {}}),
                json.dumps({"summary": "dolor sit amet " * 8, "tokens": 321}),
                2 if i % 10 == 0 else 1,
                t + timedelta(milliseconds=400),
                t + timedelta(milliseconds=900),
            )
        )
        if i % 10 == 0:
            detail = {
                "started_at": t.isoformat(),
                "finished_at": (t + timedelta(milliseconds=200)).isoformat(),
                "error": {"type": "RateLimitError", "message": "429", "traceback": "Tb\n" * 20},
                "retry_in": 0.2,
            }
            events.append((rid, t, "attempt_failed", steps[-1][1], 1, json.dumps(detail)))
    await conn.copy_records_to_table(
        "steps",
        schema_name="flowkeeper",
        columns=[
            "run_id",
            "key",
            "position",
            "name",
            "kind",
            "status",
            "input",
            "output",
            "attempts",
            "started_at",
            "finished_at",
        ],
        records=steps,
    )
    await conn.copy_records_to_table(
        "events",
        schema_name="flowkeeper",
        columns=["run_id", "at", "kind", "step_key", "attempt", "detail"],
        records=events,
    )
    await conn.execute("VACUUM ANALYZE flowkeeper.runs")
    await conn.execute("VACUUM ANALYZE flowkeeper.steps")
    return key, str(rid)


async def timed(client: httpx.AsyncClient, url: str, repeat: int) -> tuple[float, float, int]:
    await client.get(url)  # warm: connection, plan cache
    samples = []
    size = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        response = await client.get(url)
        samples.append((time.perf_counter() - t0) * 1000)
        response.raise_for_status()
        size = len(response.content)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.95) - 1], size


async def dashboard_times(url: str, runs: int, repeat: int) -> bool:
    port = free_port()
    fk = FlowKeeper(
        url,
        signing_key="bench-signing-key-0123456789abcdef",
        endpoint=f"http://127.0.0.1:{port}/api/flowkeeper",
        dashboard_password=PASSWORD,
    )
    await fk.migrate()
    conn = await asyncpg.connect(url)
    try:
        existing = await conn.fetchval("SELECT count(*) FROM flowkeeper.runs")
        if existing:
            raise SystemExit("the database already has runs: give the benchmark a scratch one")
        t0 = time.perf_counter()
        key, long_run = await fill(conn, runs)
        print(f"filled {runs:,} runs + one 300-step run in {time.perf_counter() - t0:.1f} s")
    finally:
        await conn.close()

    server = uvicorn.Server(
        uvicorn.Config(fk.asgi(), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
        await asyncio.sleep(0.01)
    ok = True
    ui = "/api/flowkeeper/ui"
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await client.post(f"{ui}/login", data={"password": PASSWORD, "next": f"{ui}/"})
            page = (await client.get(f"{ui}/api/runs", params={"limit": 50})).json()
            deep = page["next_before"]
            for _ in range(40):  # 2,000 runs deep
                page = (await client.get(f"{ui}/api/runs", params={"before": deep})).json()
                deep = page["next_before"]
            cases = [
                ("list page, no filter (HTML)", f"{ui}/"),
                ("list JSON, no filter", f"{ui}/api/runs"),
                ("list JSON, status=failed", f"{ui}/api/runs?status=failed"),
                ("list JSON, status=running", f"{ui}/api/runs?status=running"),
                ("list JSON, workflow=checkout", f"{ui}/api/runs?workflow=checkout"),
                (
                    "list JSON, workflow+status=failed",
                    f"{ui}/api/runs?workflow=checkout&status=failed",
                ),
                ("list JSON, since=1h", f"{ui}/api/runs?since=1h"),
                ("list JSON, search idempotency key", f"{ui}/api/runs?q={key}"),
                ("list JSON, search run id", f"{ui}/api/runs?q={long_run}"),
                ("list JSON, page 41 (cursor)", f"{ui}/api/runs?before={deep}"),
                ("run page, 300 steps (HTML)", f"{ui}/runs/{long_run}"),
                ("run JSON, 300 steps", f"{ui}/api/runs/{long_run}"),
            ]
            print(f"\n{'request':<38} {'median':>9} {'p95':>9} {'bytes':>9}")
            for label, path in cases:
                median, p95, size = await timed(client, path, repeat)
                mark = "" if median < 150 else "  <-- over 150 ms"
                ok = ok and median < 150
                print(f"{label:<38} {median:>7.1f}ms {p95:>7.1f}ms {size:>9,}{mark}")
            etag = (await client.get(f"{ui}/api/runs/{long_run}")).headers["etag"]
            samples = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                r = await client.get(f"{ui}/api/runs/{long_run}", headers={"If-None-Match": etag})
                samples.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 304
            print(f"{'run poll, unchanged (304)':<38} {statistics.median(samples):>7.1f}ms")
    finally:
        server.should_exit = True
        await task
        await fk.aclose()
    return ok


async def trigger_rate(url: str, n: int, with_indexes: bool) -> float:
    fk = FlowKeeper(url, signing_key="bench-signing-key-0123456789abcdef")

    @fk.workflow("bench")
    async def bench(ctx: Context, i: int) -> None:
        return None

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE flowkeeper.runs CASCADE")
        await conn.execute("DROP INDEX IF EXISTS flowkeeper.runs_status_idx")
        await conn.execute("DROP INDEX IF EXISTS flowkeeper.runs_workflow_idx")
        if with_indexes:
            await conn.execute("CREATE INDEX runs_status_idx ON flowkeeper.runs (status, id)")
            await conn.execute(
                "CREATE INDEX runs_workflow_idx ON flowkeeper.runs (workflow, status, id)"
            )
        await fk.trigger("bench", 0)  # warm the pool
        semaphore = asyncio.Semaphore(4)

        async def one(i: int) -> None:
            async with semaphore:
                await fk.trigger("bench", i, idempotency_key=f"k{i}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t0)
    finally:
        await conn.close()
        await fk.aclose()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=30, help="requests per case")
    parser.add_argument("--triggers", type=int, default=3000, help="triggers per index setting")
    args = parser.parse_args()
    url = os.environ.get("DATABASE_URL")
    cluster = None
    if not url:
        cluster = PostgresCluster()
        url = cluster.start()
    try:
        ok = await dashboard_times(url, args.runs, args.repeat)
        print(f"\nfk.trigger() throughput, {args.triggers} inserts, 4 concurrent:")
        rates = {}
        for rnd in range(3):  # alternate, so drift hits both settings alike
            for with_indexes in (False, True):
                rate = await trigger_rate(url, args.triggers, with_indexes)
                rates.setdefault(with_indexes, []).append(rate)
                print(
                    f"  round {rnd + 1}, list indexes {'on ' if with_indexes else 'off'}: "
                    f"{rate:7.0f} triggers/s"
                )
        off, on = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"  median: off {off:.0f}/s, on {on:.0f}/s  -> on/off = {on / off:.3f}")
    finally:
        if cluster is not None:
            cluster.stop()
    print("\nall dashboard medians under 150 ms" if ok else "\nSOME MEDIANS OVER 150 ms")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
