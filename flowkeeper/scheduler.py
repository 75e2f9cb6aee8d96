"""The scheduler: find runs that need attention and invoke the endpoint.

A run needs attention when its ``due_at`` has passed: it is queued, its sleep
is over, its retry is due, or the lease of the invocation that held it expired
(the invocation died).

:class:`Scheduler` is one tick.  It claims due runs in batches with
``FOR UPDATE SKIP LOCKED``, leasing each to itself for ``dispatch_lease`` so
that no other tick dispatches it meanwhile, and keeps ``concurrency`` signed
invocations in flight over the dispatcher's one keep-alive HTTP client, claiming the
next batch as the current one drains.  The endpoint answers 202 once it has
claimed a run, so a dispatch costs one short round trip.  Any number of ticks
may run at once, on any number of machines.

A dispatch that fails (connection refused, 401, 404, 5xx) is never dropped:
the run's lease is released and it is due again after a backoff, counted in
``dispatch_failures`` and recorded as a ``dispatch_failed`` event.  When the
endpoint fails ``breaker`` dispatches in a row the tick stops early instead of
failing every due run one by one.

:class:`SchedulerLoop` is ``flowkeeper scheduler``, for users with one always-on
host: it LISTENs for runs that become due without a push (sleeps, retries,
failed pushes; see migration 0003) and keeps a timer to the next due time, so
a two-second sleep wakes within milliseconds rather than at the next cron
minute.  Notifications only shorten the wait: correctness comes from the timer
and the database, so a lost notification costs latency, never a run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import health
from .alerts import AlertSender
from .db import Database, describe
from .dispatch import Delivery, Dispatcher
from .errors import ConfigurationError, DatabaseError
from .models import TickResult
from .store import Store

if TYPE_CHECKING:
    import asyncpg

    from .client import FlowKeeper
    from .retention import Pruner
    from .schedules import Schedules

logger = logging.getLogger("flowkeeper")

#: The channel migration 0003's trigger notifies; payload "<schema> <due_at, unix seconds>".
CHANNEL = "flowkeeper_due"
#: A run id that never exists: probing with it checks reachability, signing
#: key and the endpoint's own database access without touching any run.
PROBE_RUN_ID = "00000000-0000-0000-0000-000000000000"


def dispatch_backoff(failures: int, *, cap: float = 300.0) -> timedelta:
    """Wait before re-dispatching a run whose invocation was refused ``failures`` times."""
    base = min(cap, 2.0 ** min(failures, 16))
    return timedelta(seconds=base * random.uniform(0.8, 1.2))


@dataclass(frozen=True, slots=True)
class _Claim:
    run_id: str
    token: uuid.UUID
    failures: int


class Scheduler:
    """Claims due runs and dispatches them (one tick at a time, many ticks at once)."""

    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        *,
        dispatch_lease: timedelta = timedelta(seconds=30),
        batch_size: int = 200,
        concurrency: int = 32,
        breaker: int | None = None,
        alerts: AlertSender | None = None,
        event_retention: timedelta | None = timedelta(days=7),
        schedules: Schedules | None = None,
        pruner: Pruner | None = None,
    ) -> None:
        if batch_size < 1 or concurrency < 1:
            raise ConfigurationError("batch_size and concurrency must be at least 1")
        self.store = store
        # Events past their retention are pruned by the ticks (flowkeeper.events),
        # at most every PRUNE_EVERY seconds per scheduler; None: never.
        self.event_retention = event_retention
        self._pruned_at = -math.inf
        # Cron schedules fired by every tick (flowkeeper.schedules); the
        # flow-control safety net swept now and then (flowkeeper.flowcontrol).
        self.schedules = schedules
        self.pruner = pruner  # retention: a small batch of old finished runs per tick
        self._retain_after = -math.inf
        self._swept_at = -math.inf
        self.dispatcher = dispatcher
        self.dispatch_lease = dispatch_lease
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.alerts = alerts
        #: Consecutive failed dispatches after which a tick stops claiming.
        self.breaker = breaker if breaker is not None else max(16, 2 * concurrency)
        #: The driver kind its ticks are recorded as (flowkeeper.health).
        self.driver = "python"

    async def tick(
        self,
        *,
        max_runs: int = 10_000,
        time_limit: float | None = None,
        stop: asyncio.Event | None = None,
        claimed_all: asyncio.Event | None = None,
    ) -> TickResult:
        """Dispatch up to ``max_runs`` due runs; return the counts.

        ``time_limit`` (seconds) stops claiming after that long; ``stop`` stops
        claiming and sending when set.  Dispatches already in flight finish
        either way, and runs claimed but not sent are released (due at once).
        ``claimed_all`` is set once the tick claims nothing more, while its
        last dispatches may still be in flight.
        """
        loop = asyncio.get_running_loop()
        give_up = None if time_limit is None else loop.time() + time_limit
        pending: collections.deque[_Claim] = collections.deque()
        running: set[asyncio.Task[tuple[_Claim, Delivery]]] = set()
        failures: list[tuple[_Claim, Delivery]] = []
        errors: collections.Counter[str] = collections.Counter()
        claimed = dispatched = streak = 0
        more = True
        await self._flow_upkeep()
        try:
            while True:
                halted = (
                    (stop is not None and stop.is_set())
                    or (give_up is not None and loop.time() >= give_up)
                    or streak >= self.breaker
                )
                # Claim when the queue runs low, so a claimed run waits only briefly
                # for its dispatch (its lease is running).
                if more and not halted and len(pending) < self.concurrency:
                    want = min(self.batch_size, max_runs - claimed)
                    rows = await self.store.claim_due(want, self.dispatch_lease) if want else []
                    claimed += len(rows)
                    pending.extend(
                        _Claim(str(r["id"]), r["lease_token"], r["dispatch_failures"]) for r in rows
                    )
                    more = want > 0 and len(rows) == want
                if claimed_all is not None and (halted or not more):
                    claimed_all.set()
                while pending and not halted and len(running) < self.concurrency:
                    running.add(loop.create_task(self._dispatch(pending.popleft())))
                if not running:
                    break
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    claim, delivery = task.result()
                    if delivery.delivered:
                        dispatched += 1
                        streak = 0
                    else:
                        failures.append((claim, delivery))
                        errors[delivery.reason] += 1
                        streak += 1
                if len(failures) >= self.batch_size:
                    await self._record_failures(failures)
                    failures = []
        finally:
            for task in running:  # only when cancelled: their outcome is unknown
                task.cancel()
            await self._record_failures(failures)
            if pending:
                await self.store.release_claims([(c.run_id, c.token) for c in pending])
        failed = sum(errors.values())
        if streak >= self.breaker and pending:
            logger.warning(
                "tick: stopped after %d failed dispatches in a row; %d claimed runs released "
                "for the next tick",
                streak,
                len(pending),
            )
        if self.alerts is not None:  # failure alerts left undelivered (flowkeeper.alerts)
            await self.alerts.deliver_due()
        await self._prune()
        await self._retain()
        if claimed:
            logger.info("tick: claimed %d, dispatched %d, failed %d", claimed, dispatched, failed)
        result = TickResult(
            claimed=claimed, dispatched=dispatched, failed=failed, errors=dict(errors)
        )
        await health.record_tick(self.store, self.driver, result)  # driver health
        return result

    PRUNE_EVERY = 300.0
    SWEEP_EVERY = 60.0
    #: At most this share of a driver's time goes to retention.  A scheduler
    #: loop under load ticks back to back, and pruning on every one of those
    #: ticks would take a Postgres backend's worth of CPU from the runs.
    RETAIN_SHARE = 0.1

    async def _retain(self) -> None:
        """Delete a small batch of finished runs past their retention (never the tick's failure).

        Every tick, unless a backlog is being worked off and pruning now would
        take more than RETAIN_SHARE of this driver's time: a batch that deleted
        runs (or failed) in t seconds is followed by none for
        t * (1 / RETAIN_SHARE - 1).  A batch with nothing to delete is cheap
        and sets no pause.
        """
        if self.pruner is None:
            return
        t0 = time.monotonic()
        if t0 < self._retain_after:
            return
        deleted: int | None
        try:
            deleted = await self.pruner.prune()
        except Exception as exc:
            logger.warning("tick: pruning finished runs failed: %s", exc)
            deleted = None  # paced as a full batch would be
        if deleted != 0:
            self._retain_after = t0 + (time.monotonic() - t0) / self.RETAIN_SHARE
        if deleted:
            logger.info("tick: deleted %d finished run(s) past their retention", deleted)

    async def _flow_upkeep(self) -> None:
        """Fire due cron slots; now and then wake runs parked on keys with free slots."""
        if self.schedules is not None:
            try:
                await self.schedules.fire_due()
            except Exception as exc:
                logger.warning("tick: firing cron schedules failed: %s", exc)
        now = time.monotonic()
        if now - self._swept_at >= self.SWEEP_EVERY:
            self._swept_at = now
            try:
                woken = await self.store.flow_sweep()
            except Exception as exc:
                logger.warning("tick: the concurrency-slot sweep failed: %s", exc)
            else:
                if woken:
                    logger.info("tick: woke %d parked run(s) whose key had a free slot", woken)

    async def _prune(self) -> None:
        """Delete a batch of events no live run can still match (never the tick's failure)."""
        if self.event_retention is None:
            return
        now = time.monotonic()
        if now - self._pruned_at < self.PRUNE_EVERY:
            return
        self._pruned_at = now
        try:
            pruned = await self.store.prune_events(self.event_retention)
        except Exception as exc:
            logger.warning("tick: pruning old events failed: %s", exc)
            return
        if pruned:
            logger.info("tick: pruned %d event(s) past their retention", pruned)

    async def _dispatch(self, claim: _Claim) -> tuple[_Claim, Delivery]:
        try:
            delivery = await self.dispatcher.invoke(claim.run_id, str(claim.token))
        except Exception as exc:  # a bug or an odd transport error: still never drop the run
            delivery = Delivery(claim.run_id, False, None, f"{type(exc).__name__}: {exc}")
        return claim, delivery

    async def _record_failures(self, failures: list[tuple[_Claim, Delivery]]) -> None:
        if not failures:
            return
        rows = []
        for claim, delivery in failures:
            delay = dispatch_backoff(claim.failures + 1).total_seconds()
            rows.append((claim.run_id, claim.token, delay, delivery.reason))
            logger.debug(
                "dispatch of run %s failed (%s); due again in %.0fs",
                claim.run_id,
                delivery.reason,
                delay,
            )
        await self.store.dispatch_failed(rows)
        by_reason = collections.Counter(delivery.reason for _, delivery in failures)
        for reason, count in by_reason.most_common():
            sample = next(c.run_id for c, d in failures if d.reason == reason)
            logger.warning(
                "dispatch to %s failed for %d run(s) (e.g. %s): %s; retried with backoff",
                self.dispatcher.endpoint,
                count,
                sample,
                reason,
            )

    async def probe(self) -> Delivery:
        """Send a signed invocation of a run that cannot exist.

        ``delivered`` is True only when the endpoint answered as flowkeeper
        does for an unknown run: reachable, same signing key, and its own
        database reachable.  Touches no run.
        """
        return await self.dispatcher.invoke(PROBE_RUN_ID, None)


class SchedulerLoop:
    """``flowkeeper scheduler``: tick whenever a run falls due, until stopped.

    Needs a direct (session) connection for LISTEN: a transaction pooler
    (PgBouncer in transaction mode, Supavisor on 6543, Neon's ``-pooler``
    hosts) drops notifications.  Pass ``listen_url`` when ``fk``'s database
    URL is pooled.  Several loops may run at once: claims never overlap.
    """

    #: Ticks whose dispatches may be in flight at once.
    MAX_TICKS = 4

    def __init__(
        self,
        fk: FlowKeeper,
        *,
        listen_url: str | None = None,
        max_idle: float = 30.0,
        poll_interval: float = 1.0,
        batch_size: int = 200,
        concurrency: int = 32,
    ) -> None:
        if fk.dispatcher is None:
            raise ConfigurationError(
                "The scheduler needs the endpoint URL to invoke: pass endpoint=... or set "
                "FLOWKEEPER_ENDPOINT."
            )
        self.listen_db = Database(listen_url) if listen_url else fk.db
        if self.listen_db.pooled:
            raise ConfigurationError(
                f"The scheduler LISTENs for due runs, which needs a direct (session) connection, "
                f"but {describe(self.listen_db.url)} is a transaction pooler: notifications "
                "would be lost. Pass --listen-url (FLOWKEEPER_LISTEN_URL) with a direct URL: "
                "Supabase: the pooler's port 5432 (session mode) or the db.<ref>.supabase.co "
                "host; Neon: the host name without '-pooler'."
            )
        self.schema = fk.schema
        self.store = fk.store
        self.scheduler = Scheduler(
            fk.store,
            fk.dispatcher,
            dispatch_lease=fk.dispatch_lease,
            batch_size=batch_size,
            concurrency=concurrency,
            alerts=fk.alerts,
            event_retention=fk.event_retention,
            schedules=fk.schedules,
            pruner=fk.pruner,
        )
        self.scheduler.driver = "loop"
        self.max_idle = max_idle
        self.poll_interval = poll_interval
        self.ticks = 0
        self.dispatched = 0
        self._stopping = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._listening = False
        #: Called each time the LISTEN connection is up (the CLI says "listening" then).
        self.on_listening: Callable[[], None] | None = None
        self._db_failing = False  # an outage is logged once, and its end once
        self._wake_at = 0.0
        self._not_before = 0.0
        self._notified = math.inf  # earliest due time announced since the last query
        self._db_backoff = 0.0
        self._endpoint_backoff = 0.0
        #: The database clock minus this event loop's clock, from the last query.
        self._clock_offset: float | None = None

    # control -------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish: in-flight dispatches complete, nothing new starts."""
        self._stopping.set()
        self._wakeup.set()

    @property
    def listening(self) -> bool:
        return self._listening

    async def run(self) -> None:
        """Tick, sleep until the next due time or a notification, repeat; until stop()."""
        listener = asyncio.create_task(self._listen())
        try:
            # Say at once when the endpoint cannot be used (it also opens the HTTP
            # connection the first wake-up would otherwise wait for).
            probe = await self.scheduler.probe()
            if not probe.delivered:
                logger.warning(
                    "scheduler: the endpoint %s does not accept invocations yet: %s",
                    self.scheduler.dispatcher.endpoint,
                    probe.reason,
                )
            await self._ticking()
        finally:
            self.stop()
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    # notifications ---------------------------------------------------------------
    def _on_notify(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        schema, _, due = str(payload).partition(" ")
        if schema != self.schema:
            return
        try:
            # The payload is the due time on the database's clock: absolute, so
            # the time its commit took does not make the wake-up late.
            at = float(due) - self._clock_offset if self._clock_offset is not None else 0.0
        except ValueError:
            return
        self._notified = min(self._notified, at)
        if at < self._wake_at:
            self._wake_at = at
            self._wakeup.set()

    async def _listen(self) -> None:
        """Keep a LISTEN connection open; reconnect with backoff when it drops."""
        backoff = 0.5
        failing = False
        while not self._stopping.is_set():
            try:
                conn = await self.listen_db.connect()
            except DatabaseError as exc:
                # Once per outage: a retry loop must not fill the log with one line a second.
                log = logger.debug if failing else logger.warning
                log("scheduler: cannot LISTEN (%s); polling until it can", exc)
                failing = True
                await self._pause(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            failing = False
            try:
                await self._hold(conn)
                backoff = 0.5
            except Exception as exc:
                logger.warning("scheduler: LISTEN connection lost (%s); reconnecting", exc)
            finally:
                self._listening = False
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 5)

    async def _hold(self, conn: asyncpg.Connection) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(CHANNEL, self._on_notify)
        self._listening = True
        # Anything that fell due while nobody listened is found by the next tick.
        self._wake_at = 0.0
        self._wakeup.set()
        logger.info("scheduler: listening on %s for schema %s", CHANNEL, self.schema)
        if self.on_listening is not None:
            self.on_listening()
        while not lost.is_set() and not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self.max_idle)
            if not lost.is_set() and not self._stopping.is_set():
                # A half-open TCP connection never ends by itself: ask it something.
                await conn.fetchval("SELECT 1", timeout=10)

    # ticking -------------------------------------------------------------------
    async def _ticking(self) -> None:
        """Start a tick whenever runs fall due; dispatches overlap the next wait.

        A tick is awaited only until it has claimed everything due: its
        invocations may still be waiting for their 202 while the loop sleeps
        toward the next due time, so a slow endpoint does not delay the
        wake-ups of other runs.  At most ``MAX_TICKS`` ticks are in flight.
        """
        loop = asyncio.get_running_loop()
        ticks: set[asyncio.Task[TickResult]] = set()
        try:
            while not self._stopping.is_set():
                self._notified = math.inf
                if len(ticks) >= self.MAX_TICKS:
                    await asyncio.wait(ticks, return_when=asyncio.FIRST_COMPLETED)
                claimed_all = asyncio.Event()
                tick = loop.create_task(
                    self.scheduler.tick(stop=self._stopping, claimed_all=claimed_all)
                )
                ticks.add(tick)
                tick.add_done_callback(ticks.discard)
                tick.add_done_callback(self._tick_done)
                claiming = loop.create_task(claimed_all.wait())
                await asyncio.wait({tick, claiming}, return_when=asyncio.FIRST_COMPLETED)
                claiming.cancel()
                due = None
                if not (tick.done() and isinstance(tick.exception(), DatabaseError)):
                    try:
                        asked = loop.time()
                        due, db_now = await self.store.next_due()
                        self._clock_offset = db_now - (asked + loop.time()) / 2
                    except DatabaseError as exc:
                        self._database_failed(exc)
                now = loop.time()
                idle = now + (self.max_idle if self._listening else self.poll_interval)
                wake = idle
                if due is not None and self._clock_offset is not None:
                    wake = min(idle, due - self._clock_offset + 0.001)
                self._wake_at = min(wake, self._notified)
                await self._sleep()
        finally:
            if ticks:  # stopping: the dispatches in flight finish
                await asyncio.gather(*ticks, return_exceptions=True)

    def _tick_done(self, task: asyncio.Task[TickResult]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, DatabaseError):
            self._database_failed(exc)
            return
        if exc is not None:
            logger.error("scheduler: tick failed", exc_info=exc)
            return
        result = task.result()
        if self._db_failing:
            self._db_failing = False
            logger.warning("scheduler: the database answers again")
        self.ticks += 1
        self.dispatched += result.dispatched
        self._db_backoff = 0.0
        if result.failed and not result.dispatched:
            # The endpoint is failing: failed runs are backed off one by one,
            # and the loop itself waits before trying again.
            self._endpoint_backoff = min(max(self._endpoint_backoff * 2, 1.0), 60.0)
            self._not_before = asyncio.get_running_loop().time() + self._endpoint_backoff
        elif result.dispatched:
            self._endpoint_backoff = 0.0

    def _database_failed(self, exc: DatabaseError) -> None:
        self._db_backoff = min(max(self._db_backoff * 2, 0.5), 30.0)
        log = logger.debug if self._db_failing else logger.error
        log("scheduler: %s; retrying until it answers (every %.1fs at most)", exc, self._db_backoff)
        self._db_failing = True
        self._not_before = asyncio.get_running_loop().time() + self._db_backoff

    async def _sleep(self) -> None:
        """Until the wake time (moved earlier by notifications), no earlier than not_before."""
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            self._wakeup.clear()
            delay = max(self._wake_at, self._not_before) - loop.time()
            if delay <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), delay)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
