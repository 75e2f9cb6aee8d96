"""Workflows of the parallel fault tests (served by tests/apps/parallel_app.py, SIGKILLed).

``gather20`` runs 20 branches at once, each logging its execution into
``fault_log`` (tests/apps/crashy.py) with whether its result was already
recorded: a row with ``recorded_before = true`` is a finished branch run again.
"""

from __future__ import annotations

import asyncio

from flowkeeper import Context, define_workflow

from .crashy import side_effect

WIDTH = 20


async def branch(run_id: str, key: str, seconds: float) -> str:
    await side_effect(run_id, key)
    await asyncio.sleep(seconds)
    return key


async def gather20(ctx: Context, spread: float) -> list[str]:
    # Branch i takes i * spread seconds: a kill lands with some finished, some running.
    results = await asyncio.gather(
        *(ctx.step(f"b{i:02d}", branch, ctx.run_id, f"b{i:02d}", i * spread) for i in range(WIDTH))
    )
    return list(results)


gather_workflow = define_workflow("gather20", gather20)


async def leaf(ctx: Context, i: int) -> int:
    """A child: two recorded steps, the second a 3-way gather."""
    await ctx.step("first", side_effect, ctx.run_id, "first")
    parts = await asyncio.gather(
        *(ctx.step(f"part:{j}", side_effect, ctx.run_id, f"part:{j}") for j in range(3))
    )
    return i + len(parts)


async def fanout(ctx: Context, n: int) -> int:
    """A parent: starts ``n`` children (20 live at a time), waits for all of them."""
    await ctx.step("before", side_effect, ctx.run_id, "before")
    handles = [await ctx.start_child(f"child:{i}", "leaf", i, max_concurrency=20) for i in range(n)]
    results = await ctx.wait_for_children(handles)
    await ctx.step("after", side_effect, ctx.run_id, "after")
    return sum(results)


leaf_workflow = define_workflow("leaf", leaf)
fanout_workflow = define_workflow("fanout", fanout)
