"""The dispatcher's HTTP transport, several ways, on the end-to-end throughput benchmark.

    ./bench/run --help >/dev/null        # once: makes .venv-bench
    .venv-bench/bin/python -m bench.transports [--workflows 1000] [--rounds 5]

The workload is bench.compare's throughput figure (``bench.core.run_batch``:
three-step workflows triggered and run to completion, the endpoint under
uvicorn in a subprocess, runs pushed by trigger).  Only the transport of the
triggering process's :class:`~flowkeeper.dispatch.Dispatcher` changes:

- ``aiohttp``: the dispatcher's own client (``flowkeeper.dispatch.HTTPClient``);
- ``httpx``: an ``httpx.AsyncClient`` on a tuned ``AsyncHTTPTransport``
  (HTTP/1.1 only, a keep-alive pool as large as the connection limit, no
  retries, no environment lookups).

It also compared a hand-written asyncio client (``flowkeeper/http11.py``,
removed in the commit that moved the dispatcher to aiohttp; check that commit's
parent out to run it again): no faster end to end, so it went.

Each variant maps its exceptions onto the ones the dispatcher catches, so the
dispatcher's logic is the same in all three.  Rounds are interleaved
(aiohttp, httpx, then again) so that load on a shared machine falls on
all alike; medians and ranges of workflows/s are printed, each variant's
ratio to the first variant as the median of per-round ratios, and the CPU time
the triggering (dispatching) process spent per workflow, which the load of a
shared machine disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import httpx

from flowkeeper import dispatch
from flowkeeper.dispatch import Dispatcher

from .common import durable_cluster, interpreter, median, quiesce, served_app, table
from .core import run_batch


class Transport(Protocol):
    async def post(
        self, url: str, *, content: bytes, headers: Mapping[str, str]
    ) -> dispatch.Response: ...

    async def aclose(self) -> None: ...


class HttpxTransport:
    def __init__(self, d: Dispatcher, pool: int | None = None) -> None:
        size = pool or d.max_connections
        limits = httpx.Limits(
            max_connections=size,
            max_keepalive_connections=size,
            keepalive_expiry=30.0,
        )
        transport = httpx.AsyncHTTPTransport(http1=True, http2=False, limits=limits, retries=0)
        self.client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(d.ack_timeout, connect=d.connect_timeout),
            trust_env=False,
            follow_redirects=False,
        )

    async def post(
        self, url: str, *, content: bytes, headers: Mapping[str, str]
    ) -> dispatch.Response:
        try:
            r = await self.client.post(url, content=content, headers=headers)
        except httpx.ReadTimeout as exc:
            raise dispatch.ReadTimeout(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise dispatch.HTTPError(str(exc)) from exc
        return dispatch.Response(r.status_code, dict(r.headers), r.content)

    async def aclose(self) -> None:
        await self.client.aclose()


VARIANTS: dict[str, Callable[[Dispatcher, int | None], Any]] = {
    "aiohttp": lambda d, pool: dispatch.HTTPClient(
        connect_timeout=d.connect_timeout,
        read_timeout=d.ack_timeout,
        max_connections=pool or d.max_connections,
    ),
    "httpx": HttpxTransport,
}


def use(variant: str) -> None:
    """Make every Dispatcher of this process build its client with ``variant``.

    ``name`` or ``name:N``, N the connection limit (default: the dispatcher's, 64).
    """
    name, _, size = variant.partition(":")
    factory, pool = VARIANTS[name], int(size) if size else None

    def _http(self: Dispatcher) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = factory(self, pool)
            self._loop = loop
        return self._client

    Dispatcher._http = _http  # type: ignore[method-assign]


async def main_async(args: argparse.Namespace) -> None:
    rates: dict[str, list[float]] = {v: [] for v in args.variants}
    cpu: dict[str, list[float]] = {v: [] for v in args.variants}
    with durable_cluster() as cluster, served_app(cluster.url) as endpoint:
        for variant in args.variants:  # warm up the app and each client's imports
            use(variant)
            await run_batch(cluster.url, endpoint, "three", args.warmup, args.concurrency, settle=0)
        for number in range(args.rounds):
            for variant in args.variants:
                use(variant)
                await quiesce(cluster.url)
                started = time.process_time()
                result = await run_batch(
                    cluster.url, endpoint, "three", args.workflows, args.concurrency, settle=0
                )
                cpu[variant].append((time.process_time() - started) / args.workflows * 1000)
                rates[variant].append(result["per_second"])
                print(
                    f"round {number + 1}/{args.rounds} {variant}: "
                    f"{result['per_second']:.0f} workflows/s, {cpu[variant][-1]:.2f} ms CPU/wf",
                    file=sys.stderr,
                )
    base = args.variants[0]
    rows = []
    for variant, values in rates.items():
        ratios = [b / v for b, v in zip(rates[base], values, strict=True)]
        rows.append(
            [
                variant,
                f"{median(values):.0f}",
                f"{min(values):.0f}-{max(values):.0f}",
                f"{median(ratios):.2f}",
                f"{median(cpu[variant]):.2f}",
            ]
        )
    print(
        f"\n{args.workflows} three-step workflows per round, {args.rounds} interleaved rounds, "
        f"concurrency {args.concurrency}"
    )
    headers = ["transport", "workflows/s (median)", "range", f"{base}/this (median)"]
    print(table(rows, [*headers, "triggering process CPU ms/wf (median)"]))
    print(f"\ncommand: {' '.join([interpreter(), '-m', 'bench.transports', *sys.argv[1:]])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--workflows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        help=f"among {', '.join(VARIANTS)}; NAME:N sets the connection limit to N",
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
