"""``python -m bench.peers NAME [worker] --database-url URL [--workflows N]``.

Runs one peer's benchmark and prints one JSON line with its figures.  The
peer's module is imported (not run as ``__main__``), so the libraries that
care where their app object lives find it at its import path.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib

PEERS = {
    "dbos": "bench.peers.dbos_peer",
    "procrastinate": "bench.peers.procrastinate_peer",
    "pgqueuer": "bench.peers.pgqueuer_peer",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("role", choices=["driver", "worker"], nargs="?", default="driver")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--workflows", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    module = importlib.import_module(PEERS[args.peer])
    if args.role == "worker":
        asyncio.run(module.run_worker(args.database_url))
    else:
        asyncio.run(module.drive(args))


if __name__ == "__main__":
    main()
