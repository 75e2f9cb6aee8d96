"""Cold start: import time and first-request latency, each in fresh processes.

    .venv/bin/python bench/coldstart.py            # private Postgres from the system binaries
    DATABASE_URL=postgresql://... .venv/bin/python bench/coldstart.py

1. Import time (median of N fresh interpreters): ``import flowkeeper`` against
   importing its runtime dependencies alone (pydantic, starlette, itsdangerous,
   the modules flowkeeper loads at import), and the two adapters.
2. First request (median of N fresh processes): import ``examples/vercel``'s
   app, then time its first database-backed request (``GET /api/orders/<id>``:
   pool creation, schema check, the queries) through the ASGI app, against one
   plain ``asyncpg.connect`` to the same database in the same process.  The
   target is first request <= 100 ms + one connect.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import bytecode_env, compile_sources  # noqa: E402

KEY = "bench-signing-key-0123456789abcdef"

IMPORTS = {
    "dependencies": "import pydantic, starlette.applications, starlette.routing, "
    "starlette.responses, itsdangerous",
    "flowkeeper": "import flowkeeper",
    "flowkeeper + vercel adapter": "import flowkeeper_vercel",
    "flowkeeper + lambda adapter": "import flowkeeper_aws_lambda",
}

FIRST_REQUEST = textwrap.dedent(
    """
    import asyncio, json, runpy, sys, time
    t0 = time.perf_counter()
    module = runpy.run_path(sys.argv[1] + "/api/index.py", run_name="index")
    t_import = time.perf_counter() - t0
    import httpx, asyncpg

    async def main():
        transport = httpx.ASGITransport(app=module["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            t = time.perf_counter()
            r = await http.get("/api/orders/" + sys.argv[2])
            first = time.perf_counter() - t
            assert r.status_code == 200, r.text
            t = time.perf_counter()
            r = await http.get("/api/orders/" + sys.argv[2])
            second = time.perf_counter() - t
        t = time.perf_counter()
        conn = await asyncpg.connect(sys.argv[3])
        connect = time.perf_counter() - t
        await conn.close()
        print(json.dumps({"import": t_import, "first": first, "second": second,
                          "connect": connect}))

    asyncio.run(main())
    """
)


def import_time(statement: str) -> float:
    compile_sources_once()
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=bytecode_env()
    ).stdout
    return float(out)


_compiled = False


def compile_sources_once() -> None:
    global _compiled
    if not _compiled:
        compile_sources()
        _compiled = True


async def prepare(url: str) -> str:
    from flowkeeper import FlowKeeper

    os.environ["CHECKOUT_REVIEW_DELAY"] = "1"
    module = __import__("runpy").run_path(str(ROOT / "examples/vercel/api/index.py"))
    fk: FlowKeeper = module["fk"]
    fk.dispatcher = None  # leave the run queued: only reading is measured
    await fk.migrate()
    handle = await fk.trigger(
        "checkout", module["Order"](id="bench", email="a@b.c", amount_cents=1)
    )
    await fk.aclose()
    return handle.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=11)
    args = parser.parse_args()

    print(f"import time, median of {args.runs} fresh interpreters")
    medians = {}
    for name, statement in IMPORTS.items():
        samples = [import_time(statement) for _ in range(args.runs)]
        medians[name] = statistics.median(samples)
        print(f"  {name:30s} {medians[name] * 1000:7.1f} ms")
    ratio = medians["flowkeeper"] / medians["dependencies"]
    print(f"  flowkeeper / dependencies      {ratio:7.2f}x   (target <= 1.10x)")

    cluster = None
    url = os.environ.get("DATABASE_URL")
    if not url:
        from flowkeeper.testing import PostgresCluster

        cluster = PostgresCluster()
        url = cluster.start()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "FLOWKEEPER_SIGNING_KEY": KEY,
        "CRON_SECRET": "bench-cron-secret",
        "FLOWKEEPER_ENDPOINT": "http://127.0.0.1:9/api/flowkeeper",
    }
    os.environ.update(env)
    compile_sources_once()
    try:
        run_id = asyncio.run(prepare(url))
        rows = []
        for _ in range(args.runs):
            out = subprocess.run(
                [sys.executable, "-c", FIRST_REQUEST, str(ROOT / "examples/vercel"), run_id, url],
                capture_output=True,
                text=True,
                env=bytecode_env(env),
                check=True,
            ).stdout
            rows.append(json.loads(out))
    finally:
        if cluster is not None:
            cluster.stop()

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows) * 1000

    print(f"\nfirst request in a fresh process (examples/vercel), median of {args.runs}")
    print(f"  import + build the app         {med('import'):7.1f} ms")
    print(f"  first request (DB-backed)      {med('first'):7.1f} ms")
    print(f"  second request                 {med('second'):7.1f} ms")
    print(f"  one asyncpg.connect            {med('connect'):7.1f} ms")
    over = statistics.median((r["first"] - r["connect"]) * 1000 for r in rows)
    print(f"  first request - one connect    {over:7.1f} ms   (target <= 100 ms)")


if __name__ == "__main__":
    main()
