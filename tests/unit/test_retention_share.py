"""A driver gives retention at most Scheduler.RETAIN_SHARE of its time.

A scheduler loop under load ticks back to back; pruning a batch on every one
of those ticks would take a Postgres backend from the runs for as long as a
backlog lasts.  Driven here with a pruner whose batches take a known time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from flowkeeper.scheduler import Scheduler


class SlowPruner:
    def __init__(self, seconds: float, *, fails: bool = False, deletes: int = 200) -> None:
        self.seconds = seconds
        self.fails = fails
        self.deletes = deletes
        self.calls = 0
        self.busy = 0.0

    async def prune(self, batch: int | None = None) -> int:
        self.calls += 1
        t0 = time.monotonic()
        await asyncio.sleep(self.seconds)
        self.busy += time.monotonic() - t0
        if self.fails:
            raise RuntimeError("the database went away")
        return self.deletes


async def _tick_back_to_back(pruner: SlowPruner, seconds: float) -> float:
    scheduler = Scheduler(None, None, pruner=pruner)  # type: ignore[arg-type]
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        await scheduler._retain()
        await asyncio.sleep(0.001)  # the rest of a tick
    return time.monotonic() - t0


async def test_back_to_back_ticks_prune_a_tenth_of_the_time() -> None:
    pruner = SlowPruner(0.02)
    elapsed = await _tick_back_to_back(pruner, 1.0)
    # Unpaced, ~45 batches would run in that second; paced, about five.
    assert 2 <= pruner.calls <= 8, pruner.calls
    assert pruner.busy <= Scheduler.RETAIN_SHARE * elapsed + pruner.seconds * 1.5


async def test_a_failing_prune_is_paced_too() -> None:
    pruner = SlowPruner(0.02, fails=True)
    await _tick_back_to_back(pruner, 0.5)
    assert 1 <= pruner.calls <= 5, pruner.calls


async def test_the_first_tick_prunes_and_a_quiet_driver_prunes_every_tick() -> None:
    pruner = SlowPruner(0.001)
    scheduler: Any = Scheduler(None, None, pruner=pruner)  # type: ignore[arg-type]
    for _ in range(5):  # ticks a second apart, as an idle loop's
        await scheduler._retain()
        scheduler._retain_after -= 1.0  # as if a second had passed
    assert pruner.calls == 5


async def test_with_nothing_to_delete_every_tick_looks() -> None:
    pruner = SlowPruner(0.02, deletes=0)  # no backlog: each look is cheap, none paced
    await _tick_back_to_back(pruner, 0.5)
    assert pruner.calls >= 15, pruner.calls
