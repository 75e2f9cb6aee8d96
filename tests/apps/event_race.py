"""The event-race fault test's workflow (served by ``tests.apps.event_race_app``).

Run ``i`` takes a first step of random length (so its wait is recorded at a
moment that varies from run to run), then waits for event ``race`` with
``match={"i": i}`` and returns that event's data.  The test sends each run's
event at a random moment and SIGKILLs this server meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

from flowkeeper import Context, define_workflow

FIRST_STEP = float(os.environ.get("RACE_FIRST_STEP", "0.05"))  # longest first step (s)


async def first(i: int) -> int:
    await asyncio.sleep(random.uniform(0, FIRST_STEP))
    return i


async def racer(ctx: Context, i: int) -> Any:
    await ctx.step("first", first, i)
    return await ctx.wait_for_event("got", event="race", match={"i": i})


racer_workflow = define_workflow("racer", racer)
