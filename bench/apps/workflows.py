"""Workflows the benchmarks run: trivial steps, so flowkeeper's own cost shows."""

from __future__ import annotations

import asyncio
import random

from flowkeeper import Concurrency, Context, define_workflow

# Text that compresses about as well as prose (about 2.5x), made once.
_WORDS = [f"w{i:x}{'abcdefgh'[i % 8] * (i % 7)}" for i in range(4000)]
CORPUS = " ".join(random.Random(7).choices(_WORDS, k=120_000))[:500_000]


async def noop(i: int) -> int:
    return i + 1


async def three(ctx: Context, n: int) -> int:
    n = await ctx.step("one", noop, n)
    n = await ctx.step("two", noop, n)
    return await ctx.step("three", noop, n)


async def five(ctx: Context, n: int) -> int:
    for name in ("a", "b", "c", "d", "e"):
        n = await ctx.step(name, noop, n)
    return n


async def five_with_sleep(ctx: Context, n: int) -> int:
    n = await ctx.step("a", noop, n)
    n = await ctx.step("b", noop, n)
    await ctx.sleep("pause", 0.2)
    n = await ctx.step("c", noop, n)
    n = await ctx.step("d", noop, n)
    return await ctx.step("e", noop, n)


async def waiter(ctx: Context, n: int) -> int:
    """Waits for its own event (bench/events.py sends it), then one trivial step."""
    event = await ctx.wait_for_event("go", event="bench.go", match={"n": n})
    return await ctx.step("after", noop, event["n"])


async def io(n: int) -> int:
    """A 50 ms I/O step (an API call, a model call)."""
    await asyncio.sleep(0.05)
    return n


async def gather1(ctx: Context, n: int) -> int:
    return await ctx.step("io", io, n)


async def gather20(ctx: Context, n: int) -> int:
    parts = await asyncio.gather(*(ctx.step(f"io:{i}", io, n) for i in range(20)))
    return sum(parts)


async def leaf(ctx: Context, n: int) -> int:
    """A trivial child: one step."""
    return await ctx.step("one", noop, n)


async def fanout(ctx: Context, n: int) -> int:
    """A parent: ``n`` trivial children, all live at once, waited for together."""
    handles = await asyncio.gather(
        *(ctx.start_child(f"c:{i}", "leaf", i, max_concurrency=max(n, 1)) for i in range(n))
    )
    return sum(await ctx.wait_for_children(handles))


async def make_text(size: int) -> str:
    # Exactly ``size`` characters in one allocation (no larger string to cut down).
    whole, part = divmod(size, len(CORPUS))
    return "".join([CORPUS] * whole + [CORPUS[:part]])


async def rewrite(text: str) -> str:
    # A new value of the same size, as a real step makes, at memory-copy speed:
    # the payload figures measure flowkeeper's handling of the value, not the
    # step's own work (str.swapcase took 9.6 ms per 500 KB here, which alone
    # capped the 500 KB figure at about 0.12 of the 100 B one).
    return text[1:] + text[:1]


async def payload(ctx: Context, size: int) -> int:
    """Three steps returning (and passing on) ``size`` characters of text."""
    a = await ctx.step("one", make_text, size)
    b = await ctx.step("two", rewrite, a)
    c = await ctx.step("three", rewrite, b)
    return len(c)


async def big(ctx: Context, size: int) -> int:
    """One step whose result is ``size`` characters (the endpoint's peak memory)."""
    text = await ctx.step("make", make_text, size)
    return len(text)


async def many(ctx: Context, n: int) -> int:
    """``n`` trivial steps in one run."""
    for i in range(n):
        await ctx.step("s", noop, i)
    return n


WORKFLOWS = {
    "three": define_workflow("three", three),
    "five": define_workflow("five", five),
    "five-with-sleep": define_workflow("five-with-sleep", five_with_sleep),
    "waiter": define_workflow("waiter", waiter),
    "gather1": define_workflow("gather1", gather1),
    "gather20": define_workflow("gather20", gather20),
    "leaf": define_workflow("leaf", leaf),
    "fanout": define_workflow("fanout", fanout),
    "payload": define_workflow("payload", payload),
    "big": define_workflow("big", big),
    "many": define_workflow("many", many),
    # bench/flowcontrol.py: the same three steps under limits that never bind: one
    # per key (100 keys), and the same plus one global limit over all its runs.
    "three-limited": define_workflow(
        "three-limited", three, concurrency=Concurrency(limit=1000, key=lambda n: f"c{n % 100}")
    ),
    "three-global": define_workflow(
        "three-global",
        three,
        concurrency=[Concurrency(limit=1000, key=lambda n: f"c{n % 100}"), Concurrency(10_000)],
    ),
}
