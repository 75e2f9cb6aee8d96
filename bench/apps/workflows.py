"""Workflows the benchmarks run: trivial steps, so flowkeeper's own cost shows."""

from __future__ import annotations

from flowkeeper import Concurrency, Context, define_workflow


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


WORKFLOWS = {
    "three": define_workflow("three", three),
    "five": define_workflow("five", five),
    "five-with-sleep": define_workflow("five-with-sleep", five_with_sleep),
    "waiter": define_workflow("waiter", waiter),
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
