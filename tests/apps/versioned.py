"""Two deploys of one workflow, for the versioning test: ``APP_VERSION=1`` or ``2``.

Version 2 adds a fraud check in place of step ``b`` (behind ``ctx.patched``)
and removes step ``d``, which runs sleeping on version 1 have not reached.
"""

from __future__ import annotations

import os

from flowkeeper import Context, define_workflow

SLEEP = float(os.environ.get("VERSIONED_SLEEP", "4"))


def mark(name: str) -> str:
    return name


async def order_v1(ctx: Context, n: int) -> list[str]:
    out = [await ctx.step("a", mark, "a"), await ctx.step("b", mark, "b")]
    await ctx.sleep("settle", SLEEP)
    out.append(await ctx.step("c", mark, "c"))
    out.append(await ctx.step("d", mark, "d"))
    return out


async def order_v2(ctx: Context, n: int) -> list[str]:
    out = [await ctx.step("a", mark, "a")]
    if ctx.patched("fraud-check-v2"):
        out.append(await ctx.step("fraud-check", mark, "fraud"))
    else:
        out.append(await ctx.step("b", mark, "b"))
    await ctx.sleep("settle", SLEEP)
    out.append(await ctx.step("c", mark, "c"))
    return out


V1 = define_workflow("order", order_v1, version="1")
V2 = define_workflow("order", order_v2, version="2")
