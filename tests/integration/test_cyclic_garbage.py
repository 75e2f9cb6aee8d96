"""An invocation leaves no reference cycles of flowkeeper's behind.

Cyclic garbage is freed only by the garbage collector, whose passes then grow
with it: under load they took about 15 % of the endpoint's CPU (py-spy on
bench.growth, 2026-12-02).  Each invocation's captured-log buffer once held
a callback that held the buffer.
"""

from __future__ import annotations

import collections
import gc
from typing import Any

from flowkeeper import Context

from ..helpers import drive, make_fk, serve


def _ours(obj: Any) -> str | None:
    module = getattr(type(obj), "__module__", "") or ""
    if type(obj).__name__ in ("function", "coroutine", "method"):
        module = getattr(obj, "__module__", "") or ""
        return getattr(obj, "__qualname__", "?") if module.startswith("flowkeeper") else None
    return type(obj).__qualname__ if module.startswith("flowkeeper") else None


async def test_invocations_leave_no_cyclic_garbage(database_url: str) -> None:
    fk = make_fk(database_url)

    @fk.workflow("three")
    async def three(ctx: Context, n: int) -> int:
        a = await ctx.step("a", lambda: n)
        b = await ctx.step("b", lambda: a + 1)
        await ctx.sleep("nap", 0.01)
        return await ctx.step("c", lambda: b + 1)

    try:
        async with serve(fk):
            await drive(fk, [(await fk.trigger("three", n)).run_id for n in range(5)])
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                await drive(fk, [(await fk.trigger("three", n)).run_id for n in range(30)])
                gc.collect()
                ours = collections.Counter(
                    name for name in map(_ours, gc.garbage) if name is not None
                )
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
    finally:
        await fk.aclose()
    assert not ours, f"reference cycles left by invocations: {ours.most_common(10)}"
