"""flowkeeper side by side with its peers, on one PostgreSQL, in one run, as one table.

    ./bench/run                                   # makes .venv-bench with the peers, runs this
    .venv-bench/bin/python -m bench.compare [--workflows 1000] [--rounds 3] [--peers ...]

One private PostgreSQL with default durability (fsync and synchronous_commit
on, pg_stat_statements preloaded); each system gets its own database on it.

- Throughput: ``--workflows`` three-step workflows triggered and run to
  completion.  flowkeeper: the endpoint under uvicorn on 127.0.0.1, runs
  pushed by trigger.  DBOS Transact: its own workflow of three steps.
  procrastinate and pgqueuer: three chained jobs per workflow.  Rounds are
  interleaved (flowkeeper, then each peer, then again) so that load on a
  shared machine falls on all of them alike; medians are reported.
- Cost: commits per workflow for every system (``pg_stat_database`` of its
  database); statements (round trips) per step and per run for flowkeeper
  (``pg_stat_statements``); steps/s against Postgres's own limit on this
  machine, pgbench's single-row INSERT transactions per second at 8 clients,
  run in every round right after flowkeeper's (a per-round ratio).
- HTTP invocations per 5-step workflow, without and with one sleep.
- Import time of flowkeeper, DBOS and the Inngest SDK in fresh interpreters.

Events and waits are measured by ``python -m bench.events`` (flowkeeper
alone: send_event among 100,000 waiting runs, a burst of events through the
endpoint against this table's three-step workload).

The peers run in their own processes (``python -m bench.peers NAME``) and are
never imported here, so the flowkeeper part runs without them (``--peers``
with no names), as the CI smoke test does.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from .coldstart import import_time
from .common import ROOT, durable_cluster, interpreter, median, quiesce, served_app, table
from .core import run_batch

PEERS = {
    # name: (label, distribution, what one workflow is)
    "dbos": ("DBOS Transact", "dbos", "workflow of 3 steps"),
    "procrastinate": ("procrastinate", "procrastinate", "3 chained jobs"),
    "pgqueuer": ("pgqueuer", "pgqueuer", "3 chained jobs"),
}
IMPORTS = {
    "flowkeeper": ("flowkeeper", "import flowkeeper"),
    "DBOS Transact": ("dbos", "import dbos"),
    "Inngest SDK": ("inngest", "import inngest"),
}
PGBENCH_SCRIPT = "INSERT INTO single_row (v) VALUES (1);\n"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


async def create_databases(admin_url: str, names: Sequence[str]) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        for name in names:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()


async def server_facts(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        return {
            name: str(await conn.fetchval(f"SHOW {name}"))
            for name in ("server_version", "fsync", "synchronous_commit", "full_page_writes")
        }
    finally:
        await conn.close()


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        memory = "?"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{os.cpu_count()} cores ({model}), {memory} RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, load {load:.1f} at the end"
    )


# pgbench -------------------------------------------------------------------------
def pgbench(url: str, bindir: Path | None, clients: int, seconds: int) -> tuple[float, str]:
    """Single-row INSERT transactions per second; returns (tps, the command line)."""
    exe = str(bindir / "pgbench") if bindir else shutil.which("pgbench")
    if exe is None:
        raise SystemExit("pgbench not found: install PostgreSQL's client tools")
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(PGBENCH_SCRIPT)
    command = [
        exe,
        "-n",
        "-c",
        str(clients),
        "-j",
        str(min(clients, os.cpu_count() or 1)),
        "-T",
        str(seconds),
        "-f",
        f.name,
        url,
    ]
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    found = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    if found is None:
        raise RuntimeError(f"unexpected pgbench output:\n{out}")
    shown = [*command[:-2], f"<file: {PGBENCH_SCRIPT.strip()}>", url]
    return float(found.group(1)), " ".join(shown)


async def prepare_pgbench(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS single_row "
            "(id bigserial PRIMARY KEY, v integer, at timestamptz DEFAULT now())"
        )
    finally:
        await conn.close()


# peers ---------------------------------------------------------------------------
def peer_command(name: str, url: str, workflows: int, warmup: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.peers",
        name,
        "--database-url",
        url,
        "--workflows",
        str(workflows),
        "--warmup",
        str(warmup),
    ]


def run_peer(name: str, url: str, workflows: int, warmup: int) -> dict[str, float]:
    out = subprocess.run(
        peer_command(name, url, workflows, warmup),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(f"peer {name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# the run -------------------------------------------------------------------------
async def measure(args: argparse.Namespace) -> dict[str, Any]:
    peers = [p for p in args.peers if _installed(PEERS[p][1])]
    skipped = [p for p in args.peers if p not in peers]
    results: dict[str, Any] = {"skipped": skipped, "rounds": {}, "peer_urls": {}}
    settle = args.stats_settle
    with durable_cluster() as cluster:
        databases = ["bench_flowkeeper", "bench_pgbench", *(f"bench_{p}" for p in peers)]
        await create_databases(cluster.url, databases)
        results["server"] = await server_facts(cluster.url)
        fk_url = cluster.dsn("bench_flowkeeper")

        pgbench_url = cluster.dsn("bench_pgbench")
        await prepare_pgbench(pgbench_url)
        tps: list[float] = []
        results["pgbench_tps"] = tps

        with served_app(fk_url) as endpoint:
            await run_batch(fk_url, endpoint, "three", args.warmup, args.concurrency, settle=0)
            rounds: dict[str, list[dict[str, float]]] = {"flowkeeper": []}
            for number in range(args.rounds):
                print(f"round {number + 1}/{args.rounds}: flowkeeper", file=sys.stderr)
                await quiesce(fk_url)
                rounds["flowkeeper"].append(
                    await run_batch(
                        fk_url, endpoint, "three", args.workflows, args.concurrency, settle=settle
                    )
                )
                # Postgres's own limit, in the same round: a share of it is a
                # side-by-side ratio, not two figures from different moments.
                print(f"round {number + 1}/{args.rounds}: pgbench", file=sys.stderr)
                await quiesce(pgbench_url)
                value, results["pgbench_command"] = pgbench(
                    pgbench_url, cluster.bindir, args.pgbench_clients, args.pgbench_seconds
                )
                tps.append(value)
                for peer in peers:
                    print(f"round {number + 1}/{args.rounds}: {peer}", file=sys.stderr)
                    url = cluster.dsn(f"bench_{peer}")
                    results["peer_urls"][peer] = url
                    await quiesce(url)
                    rounds.setdefault(peer, []).append(
                        run_peer(peer, url, args.workflows, args.warmup)
                    )
            results["rounds"] = rounds
            results["five"] = await run_batch(
                fk_url, endpoint, "five", args.invocation_workflows, args.concurrency, settle=0
            )
            results["five-with-sleep"] = await run_batch(
                fk_url,
                endpoint,
                "five-with-sleep",
                args.invocation_workflows,
                args.concurrency,
                settle=0,
            )
    results["imports"] = {
        label: median([import_time(code) for _ in range(args.import_runs)])
        for label, (module, code) in IMPORTS.items()
        if _installed(module)
    }
    return results


def render(args: argparse.Namespace, results: dict[str, Any]) -> str:
    rounds = results["rounds"]
    n = args.workflows

    def med(system: str, key: str) -> float:
        return median([r[key] for r in rounds[system]])

    def spread(system: str) -> str:
        rates = [r["per_second"] for r in rounds[system]]
        return f"{min(rates):.0f}-{max(rates):.0f}"

    def ratio(peer: str) -> float:
        # Per round, then the median: load drifts between rounds on a shared machine.
        pairs = zip(rounds["flowkeeper"], rounds[peer], strict=True)
        return median([fk["per_second"] / other["per_second"] for fk, other in pairs])

    fk_rate = med("flowkeeper", "per_second")
    rows = [
        [
            "flowkeeper " + _version("flowkeeper"),
            "workflow of 3 steps (HTTP endpoint)",
            f"{fk_rate:.0f}",
            spread("flowkeeper"),
            "",
            f"{med('flowkeeper', 'commits_per_run'):.2f}",
        ]
    ]
    for peer in rounds:
        if peer == "flowkeeper":
            continue
        label, dist, shape = PEERS[peer]
        rows.append(
            [
                f"{label} {_version(dist)}",
                shape,
                f"{med(peer, 'per_second'):.0f}",
                spread(peer),
                f"{ratio(peer):.2f}",
                f"{med(peer, 'commits_per_workflow'):.2f}",
            ]
        )
    lines = [
        f"Throughput: {n} three-step workflows triggered and run to completion; median of "
        f"{args.rounds} interleaved rounds (flowkeeper/peer: median of the per-round ratios)",
        "",
        table(
            rows,
            ["system", "one workflow is", "workflows/s", "rounds", "flowkeeper/peer", "commits/wf"],
        ),
        "",
    ]
    tps_rounds = results["pgbench_tps"]
    tps = median(tps_rounds)
    steps = 3 * fk_rate
    shares = [
        3 * r["per_second"] / t for r, t in zip(rounds["flowkeeper"], tps_rounds, strict=True)
    ]
    cost = [
        [
            "pgbench single-row INSERT tps, " + f"{args.pgbench_clients} clients (each round)",
            f"{tps:.0f} ({min(tps_rounds):.0f}-{max(tps_rounds):.0f})",
        ],
        ["flowkeeper steps/s (3 x workflows/s)", f"{steps:.0f}"],
        [
            "flowkeeper steps/s as a share of pgbench (median of rounds)",
            f"{median(shares):.1%} ({min(shares):.1%}-{max(shares):.1%})",
        ],
    ]
    if all("statements_per_run" in r for r in rounds["flowkeeper"]):
        per_run = med("flowkeeper", "statements_per_run")
        cost += [
            ["flowkeeper round trips per run (pg_stat_statements)", f"{per_run:.2f}"],
            ["flowkeeper round trips per step", f"{per_run / 3:.2f}"],
        ]
    cost += [
        [
            "HTTP invocations per 5-step workflow, no sleep",
            f"{results['five']['invocations_per_run']:.2f}",
        ],
        [
            "HTTP invocations per 5-step workflow, one sleep",
            f"{results['five-with-sleep']['invocations_per_run']:.2f}",
        ],
    ]
    for label, seconds in results["imports"].items():
        cost.append(
            [f"import time, {label} (median of {args.import_runs})", f"{seconds * 1000:.0f} ms"]
        )
    lines += [table(cost, ["figure", "value"]), ""]
    server = results["server"]
    lines += [
        f"machine: {machine()}",
        f"PostgreSQL {server['server_version']}: fsync={server['fsync']}, "
        f"synchronous_commit={server['synchronous_commit']}, "
        f"full_page_writes={server['full_page_writes']}",
    ]
    if results["skipped"]:
        lines.append(
            "not installed, skipped: "
            + ", ".join(results["skipped"])
            + " (./bench/run installs them)"
        )
    command = " ".join([interpreter(), "-m", "bench.compare", *map(shlex.quote, sys.argv[1:])])
    lines += [
        "",
        "commands:",
        f"  everything above: {command}",
        f"  pgbench limit:    {results['pgbench_command']}",
    ]
    for peer, url in results["peer_urls"].items():
        shown = peer_command(peer, url, args.workflows, args.warmup)
        shown[0] = interpreter()
        lines.append(f"  {peer + ':':17} {' '.join(shown)}")
    lines.append(
        "  flowkeeper:       bench.core.run_batch (python -m bench.core measures it alone)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--workflows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--invocation-workflows", type=int, default=200)
    parser.add_argument("--pgbench-clients", type=int, default=8)
    parser.add_argument("--pgbench-seconds", type=int, default=10)
    parser.add_argument("--import-runs", type=int, default=9)
    parser.add_argument(
        "--peers",
        nargs="*",
        choices=sorted(PEERS),
        default=list(PEERS),
        help="peers to run (default: all; none: flowkeeper alone)",
    )
    parser.add_argument(
        "--stats-settle",
        type=float,
        default=None,
        help="seconds to let commit counts settle (default 10.5; less undercounts commits)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    results = asyncio.run(measure(args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print(render(args, results))


if __name__ == "__main__":
    main()
