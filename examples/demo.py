"""The flowkeeper demo: checkout workflows on an embedded Postgres, watched live.

Run it with ``./scripts/demo``.  Without DATABASE_URL it starts a private
PostgreSQL from the machine's binaries under ``.flowkeeper/pg`` (kept between
runs, stopped at exit); the endpoint is served by uvicorn in this process and
a scheduler loop resumes retries and sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CHECKOUT_REVIEW_DELAY", "3")

import uvicorn

from examples.checkout.workflows import Order, checkout_workflow
from flowkeeper import FlowKeeper, RunInfo
from flowkeeper.scheduler import SchedulerLoop
from flowkeeper.testing import PostgresCluster
from flowkeeper.testing.postgres import free_port

DASHBOARD_PASSWORD = "flowkeeper-demo"

ORDERS = [
    Order(id="o-1001", email="ada@example.com", amount_cents=4200, flaky_card=True),
    Order(id="o-1002", email="grace@example.com", amount_cents=1999),
    Order(id="o-1003", email="linus@example.com", amount_cents=25000, flaky_card=True),
]

GREEN, RED, YELLOW, DIM, BOLD, RESET = (
    ("\033[32m", "\033[31m", "\033[33m", "\033[2m", "\033[1m", "\033[0m")
    if sys.stdout.isatty()
    else ("",) * 6
)


def say(line: str = "") -> None:
    print(line, flush=True)


class Watcher:
    """Prints what happens to each run: steps recorded, retries, sleeps, the end."""

    def __init__(self, fk: FlowKeeper, labels: dict[str, str]) -> None:
        self.fk = fk
        self.labels = labels
        self.seen: dict[str, set[str]] = {rid: set() for rid in labels}
        self.t0 = time.monotonic()

    def emit(self, run_id: str, key: str, text: str) -> None:
        if key in self.seen[run_id]:
            return
        self.seen[run_id].add(key)
        stamp = f"{time.monotonic() - self.t0:5.1f}s"
        say(f"  {DIM}{stamp}{RESET}  {BOLD}{self.labels[run_id]}{RESET}  {text}")

    def update(self, info: RunInfo) -> None:
        rid = info.id
        for step in info.steps:
            for failure in step.failed_attempts:
                self.emit(
                    rid,
                    f"fail:{step.key}:{failure.attempt}",
                    f"{RED}✗{RESET} {step.name:<15} attempt {failure.attempt} failed: "
                    f"{failure.error_type.rsplit('.', 1)[-1]}: {failure.message}"
                    f" {DIM}(retrying with backoff){RESET}",
                )
            if step.kind == "sleep":
                self.emit(
                    rid,
                    f"sleep:{step.key}",
                    f"{YELLOW}z{RESET} {step.name:<15} durable sleep until "
                    f"{step.wake_at:%H:%M:%S} {DIM}(the invocation ends; "
                    f"the scheduler wakes it){RESET}",
                )
                if step.status == "completed":
                    self.emit(rid, f"woke:{step.key}", f"{YELLOW}⏰{RESET} {step.name:<15} woke up")
            elif step.status == "completed":
                attempt = f" on attempt {step.attempts}" if step.attempts > 1 else ""
                self.emit(
                    rid,
                    f"done:{step.key}",
                    f"{GREEN}✓{RESET} {step.name:<15} {_short(step.output)}{attempt}",
                )
        if info.is_finished:
            colour = GREEN if info.status == "completed" else RED
            self.emit(
                rid,
                "end",
                f"{colour}■ run {info.status}{RESET} {DIM}after {info.invocations} "
                f"invocation(s){RESET}",
            )


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


async def demo(database_url: str, where: str, *, serve_after: bool = False) -> int:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/api/flowkeeper"
    fk = FlowKeeper(
        database_url,
        signing_key="demo-signing-key-not-for-production",
        endpoint=endpoint,
        dashboard_password=DASHBOARD_PASSWORD,
    )
    fk.register(checkout_workflow)

    say(f"{BOLD}flowkeeper demo{RESET}: durable checkout workflows")
    say(f"  database  {where}")
    say(f"  endpoint  {endpoint}  (uvicorn, in this process)")
    say("  workflow  charge-card → send-receipt → wait-for-review (durable sleep) → ask-for-review")
    say()

    server = uvicorn.Server(
        uvicorn.Config(fk.asgi(), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    # The scheduler loop resumes retries and sleeps the moment they are due
    # (LISTEN/NOTIFY plus a timer), as `flowkeeper scheduler` does.
    scheduler = SchedulerLoop(fk)
    ticking = asyncio.create_task(scheduler.run())
    try:
        run_tag = f"{int(time.time())}"
        handles = [
            await fk.trigger("checkout", order, idempotency_key=f"{order.id}-{run_tag}")
            for order in ORDERS
        ]
        labels = {h.run_id: order.id for h, order in zip(handles, ORDERS, strict=True)}
        say(f"triggered {len(handles)} runs (each pushed to the endpoint at once):")
        watcher = Watcher(fk, labels)
        deadline = time.monotonic() + 60
        finished: list[RunInfo] = []
        while time.monotonic() < deadline:
            infos = [await fk.get_run(h.run_id) for h in handles]
            for info in infos:
                watcher.update(info)
            if all(i.is_finished for i in infos):
                finished = infos
                break
            await asyncio.sleep(0.1)
        say()
        if not finished:
            say(f"{RED}runs did not finish within 60 s{RESET}")
            return 1
        ok = all(i.status == "completed" for i in finished)
        steps = sum(len([s for s in i.steps if s.kind == "step"]) for i in finished)
        retries = sum(len(s.failed_attempts) for i in finished for s in i.steps)
        invocations = sum(i.invocations for i in finished)
        colour = GREEN if ok else RED
        say(
            f"{colour}{len(finished)} runs {'completed' if ok else 'finished'}{RESET} in "
            f"{time.monotonic() - watcher.t0:.1f}s: {steps} steps recorded, {retries} retried "
            f"attempt(s), {invocations} HTTP invocations in all."
        )
        result = await fk.result(handles[0].run_id)
        say(f"output of {ORDERS[0].id}: {result}")
        say(
            f"{DIM}Runs stay in the database; any left unfinished by an interrupted demo "
            f"are resumed by the next one.{RESET}"
        )
        if serve_after:
            say()
            say(
                f"{BOLD}dashboard{RESET}  {endpoint}/ui   password: {DASHBOARD_PASSWORD}"
                f"   {DIM}(Ctrl-C to stop){RESET}"
            )
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        elif sys.stdout.isatty():
            say(f"{DIM}./scripts/demo --serve keeps it running with the dashboard.{RESET}")
        return 0 if ok else 1
    finally:
        scheduler.stop()
        await ticking
        server.should_exit = True
        await serving
        await fk.aclose()


def main() -> int:
    logging.basicConfig(level=logging.ERROR)
    # SIGTERM unwinds like Ctrl-C, through every ``finally``: the server, the
    # scheduler and the embedded PostgreSQL are all stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    serve_after = "--serve" in sys.argv[1:]
    url = os.environ.get("DATABASE_URL")
    if url:
        return _run(demo(url, f"DATABASE_URL ({url.split('@')[-1]})", serve_after=serve_after))
    data_dir = Path(os.environ.get("FLOWKEEPER_DEMO_DIR") or ROOT / ".flowkeeper") / "pg"
    say(f"{DIM}starting an embedded PostgreSQL in {data_dir} ...{RESET}")
    cluster = PostgresCluster(data_dir)
    try:
        url = cluster.start()
        where = f"embedded PostgreSQL at {url.split('@')[-1]}"
        return _run(demo(url, where, serve_after=serve_after))
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut this short
        cluster.stop()
        say(f"{DIM}embedded PostgreSQL stopped{RESET}")


def _run(coro: Any) -> int:
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        say()
        return 0


if __name__ == "__main__":
    sys.exit(main())
