"""A run's stream on its dashboard page, live, in a real headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from flowkeeper import Context

from ..helpers import make_fk, serve

PASSWORD = "browser-test-password"
UI = "/api/flowkeeper/ui"


@pytest.mark.slow
async def test_the_run_page_shows_its_stream_live(
    database_url: str, browser_context: Any, artifacts_dir: Path
) -> None:
    fk = make_fk(database_url, dashboard_password=PASSWORD)
    go_on = asyncio.Event()

    async def draft(ctx: Context) -> str:
        for word in ("Dear", "customer,"):
            await ctx.publish("draft", {"token": word})
        await go_on.wait()
        await ctx.publish("draft", {"token": "thanks."})
        return "sent"

    @fk.workflow("writer")
    async def writer(ctx: Context) -> str:
        await ctx.publish("status", "writing")
        return await ctx.step("draft", draft, ctx)

    async with serve(fk) as server:
        try:
            run_id = (await fk.trigger("writer")).run_id
            page = await browser_context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{server.base_url}{UI}/runs/{run_id}")
            await page.fill("#password", PASSWORD)
            await page.click("#login")
            await page.wait_for_selector("#stream li:nth-child(3)")
            items = await page.locator("#stream li").all_inner_texts()
            assert "status" in items[0] and "writing" in items[0]
            assert "Dear" in items[1] and "draft #1" in items[1] and "step running" in items[1]
            await page.screenshot(path=str(artifacts_dir / "stream-live.png"), full_page=True)
            go_on.set()
            await page.wait_for_selector("#stream li:nth-child(4)", timeout=20_000)
            assert "thanks." in await page.locator("#stream li").nth(3).inner_text()
            await page.wait_for_selector("#run-status .badge.s-completed", timeout=20_000)
            assert errors == []
        finally:
            go_on.set()
            with contextlib.suppress(Exception):
                await fk.aclose()
