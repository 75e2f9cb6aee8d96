"""Concurrency limits in the claim: per key, shared scopes, sleeping runs hold no slot."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg
import pytest

from flowkeeper import Concurrency, ConfigurationError, Context, FlowKeeper, InvalidInputError

from ..helpers import drive, serve


@dataclass
class Job:
    customer: str
    n: int


class Spans:
    """(key, start, end) of every step body, to compute the overlap from."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []
        self.live: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    async def work(self, key: str, seconds: float) -> None:
        t0 = time.monotonic()
        self.live[key] = self.live.get(key, 0) + 1
        self.peak[key] = max(self.peak.get(key, 0), self.live[key])
        try:
            await asyncio.sleep(seconds)
        finally:
            self.live[key] -= 1
            self.spans.append((key, t0, time.monotonic()))


def max_overlap(spans: list[tuple[str, float, float]], key: str) -> int:
    points = sorted(
        [(s, 1) for k, s, _ in spans if k == key] + [(e, -1) for k, _, e in spans if k == key],
        key=lambda p: (p[0], p[1]),
    )
    best = live = 0
    for _, d in points:
        live += d
        best = max(best, live)
    return best


async def test_limit_per_key_and_in_order(fk: FlowKeeper, conn: asyncpg.Connection) -> None:
    spans = Spans()

    @fk.workflow("limited", concurrency=Concurrency(limit=2, key=lambda job: job.customer))
    async def limited(ctx: Context, job: Job) -> int:
        await ctx.step("work", spans.work, job.customer, 0.2)
        return job.n

    async with serve(fk):
        handles = [await fk.trigger("limited", Job("a", i)) for i in range(6)]
        handles += [await fk.trigger("limited", Job("b", i)) for i in range(2)]
        statuses = await drive(fk, [h.run_id for h in handles], timeout=30)
    assert set(statuses.values()) == {"completed"}
    assert max_overlap(spans.spans, "a") == 2  # busy, never over
    assert spans.peak["a"] == 2
    assert max_overlap(spans.spans, "b") == 2  # another key is not held up by "a"
    blocked = await conn.fetchval("SELECT count(*) FROM flowkeeper.events WHERE kind = 'blocked'")
    assert blocked >= 1
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.slots") == 0


async def test_shared_scope_and_sleeping_holds_no_slot(fk: FlowKeeper) -> None:
    spans = Spans()
    scope = Concurrency(limit=1, scope="provider")

    @fk.workflow("one", concurrency=scope)
    async def one(ctx: Context, n: int) -> int:
        await ctx.step("call", spans.work, "provider", 0.15)
        await ctx.sleep("nap", 0.6)  # holds no slot: the others go on meanwhile
        await ctx.step("again", spans.work, "provider", 0.05)
        return n

    @fk.workflow("two", concurrency=[scope])
    async def two(ctx: Context, n: int) -> int:
        await ctx.step("call", spans.work, "provider", 0.15)
        return n

    async with serve(fk):
        t0 = time.monotonic()
        handles = [await fk.trigger("one", 1)]
        handles += [await fk.trigger("two", i) for i in range(3)]
        statuses = await drive(fk, [h.run_id for h in handles], timeout=30)
        took = time.monotonic() - t0
    assert set(statuses.values()) == {"completed"}
    assert max_overlap(spans.spans, "provider") == 1
    # Had the sleeping run kept its slot, the three others would wait out its sleep.
    firsts = sorted(s for k, s, _ in spans.spans)
    assert firsts[3] - firsts[0] < 0.6 + 0.15 + 0.3, (firsts, took)


def test_bad_declarations_fail_at_decoration(fk: FlowKeeper) -> None:
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ConfigurationError, match="at least 1"):
            Concurrency(limit=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="function"):
        Concurrency(limit=1, key="customer")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="scope"):
        Concurrency(limit=1, scope="")
    with pytest.raises(ConfigurationError, match="concurrency="):

        @fk.workflow("x", concurrency=[5])  # type: ignore[list-item]
        async def x(ctx: Context) -> None:
            return None

    with pytest.raises(ConfigurationError, match="priority"):

        @fk.workflow("y", priority=-1)
        async def y(ctx: Context) -> None:
            return None

    assert "x" not in fk.registry and "y" not in fk.registry


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (lambda job: job.missing, "raised AttributeError"),
        (lambda job: 42, "must return a string"),
        (lambda job: "", "non-empty"),
        (lambda job: "a\x00b", "control characters"),
        (lambda job: "\ud800", "surrogate"),
    ],
)
async def test_bad_key_function_fails_the_trigger_creating_nothing(
    fk: FlowKeeper, conn: asyncpg.Connection, key: object, message: str
) -> None:
    @fk.workflow("keyed", concurrency=Concurrency(limit=1, key=key))  # type: ignore[arg-type]
    async def keyed(ctx: Context, job: Job) -> None:
        return None

    with pytest.raises(InvalidInputError, match=message):
        await fk.trigger("keyed", Job("a", 1))
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == 0
