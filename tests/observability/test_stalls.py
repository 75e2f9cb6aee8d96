"""An async step that blocks the event loop is named, with the advice, and recorded."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from flowkeeper import ConfigurationError, Context

from ..helpers import drive, make_fk, serve


async def test_a_blocking_async_step_is_reported_and_recorded(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    fk = make_fk(database_url, stall_threshold=0.2)

    async def fetch_price() -> int:
        time.sleep(0.6)  # noqa: ASYNC251  (a sync call inside an async step: the loop stalls)
        await asyncio.sleep(0)
        return 42

    async def polite() -> int:
        await asyncio.sleep(0.5)  # awaiting is fine
        return 1

    def sync_sleeper() -> int:
        time.sleep(0.5)  # a sync step runs in a thread: fine
        return 2

    @fk.workflow("pricing")
    async def wf(ctx: Context) -> int:
        a = await ctx.step("polite", polite)
        b = await ctx.step("sync-sleeper", sync_sleeper)
        return a + b + await ctx.step("fetch-price", fetch_price)

    caplog.set_level(logging.WARNING, logger="flowkeeper")
    try:
        async with serve(fk):
            handle = await fk.trigger("pricing")
            await drive(fk, [handle.run_id])
            await asyncio.sleep(0.1)  # the event is written in the background
        info = await fk.get_run(handle.run_id)
    finally:
        await fk.aclose()
    assert info.output == 45
    warnings = [
        r.getMessage() for r in caplog.records if "blocked the event loop" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    text = warnings[0]
    assert f"run {handle.run_id}: async step 'fetch-price' (attempt 1) blocked" in text
    assert "test_stalls.py:" in text and "time.sleep(0.6)" in text
    assert "make it a sync step (def instead of async def" in text
    stalls = [e for e in info.events if e.kind == "loop_stall"]
    assert [(e.step_key, e.attempt) for e in stalls] == [("fetch-price", 1)]
    assert stalls[0].detail is not None and stalls[0].detail["seconds"] >= 0.3


def test_the_threshold_is_checked(database_url: str) -> None:
    for bad in (0, -1, float("nan"), float("inf"), "1"):
        with pytest.raises(ConfigurationError, match="stall_threshold must be a positive"):
            make_fk(database_url, stall_threshold=bad)
    assert make_fk(database_url, stall_threshold=None) is not None
