"""The scheduler tick: find runs that need attention and invoke the endpoint.

A run needs attention when its ``due_at`` has passed: it is queued, its sleep
is over, its retry is due, or the lease of the invocation that held it expired
(the invocation died).  A tick claims due runs in batches with
``FOR UPDATE SKIP LOCKED``, leasing each to itself for ``dispatch_lease`` so
that no other tick dispatches it meanwhile, then posts one signed invocation
per run with bounded concurrency.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from datetime import timedelta

from .alerts import AlertSender
from .dispatch import Delivery, Dispatcher
from .models import TickResult
from .store import Store

logger = logging.getLogger("flowkeeper")


def dispatch_backoff(failures: int, *, cap: float = 300.0) -> timedelta:
    """Wait before re-dispatching a run whose invocation was refused ``failures`` times."""
    base = min(cap, 2.0 ** min(failures, 16))
    return timedelta(seconds=base * random.uniform(0.8, 1.2))


class Scheduler:
    """Claims due runs and dispatches them."""

    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        *,
        dispatch_lease: timedelta = timedelta(seconds=30),
        batch_size: int = 200,
        concurrency: int = 32,
        alerts: AlertSender | None = None,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.dispatch_lease = dispatch_lease
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.alerts = alerts

    async def tick(self, *, max_runs: int = 10_000) -> TickResult:
        """Dispatch up to ``max_runs`` due runs; return the counts."""
        claimed = dispatched = failed = 0
        semaphore = asyncio.Semaphore(self.concurrency)

        async def dispatch_one(run_id: str, token: str, failures: int) -> Delivery:
            async with semaphore:
                delivery = await self.dispatcher.invoke(run_id, token)
            if not delivery.delivered:
                delay = dispatch_backoff(failures + 1)
                logger.warning(
                    "dispatch of run %s failed (%s); retrying in %.0fs",
                    run_id,
                    delivery.reason,
                    delay.total_seconds(),
                )
                await self.store.dispatch_failed(run_id, uuid.UUID(token), delay)
            return delivery

        while claimed < max_runs:
            rows = await self.store.claim_due(
                min(self.batch_size, max_runs - claimed), self.dispatch_lease
            )
            if not rows:
                break
            claimed += len(rows)
            results = await asyncio.gather(
                *(
                    dispatch_one(str(r["id"]), str(r["lease_token"]), r["dispatch_failures"])
                    for r in rows
                )
            )
            for delivery in results:
                if delivery.delivered:
                    dispatched += 1
                else:
                    failed += 1
            if len(rows) < self.batch_size:
                break
        if self.alerts is not None:  # failure alerts left undelivered (flowkeeper.alerts)
            await self.alerts.deliver_due()
        if claimed:
            logger.info("tick: claimed %d, dispatched %d, failed %d", claimed, dispatched, failed)
        return TickResult(claimed=claimed, dispatched=dispatched, failed=failed)
