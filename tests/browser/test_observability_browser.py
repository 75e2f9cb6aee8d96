"""Step logs under their step, the driver-health banner and an overdue run, in Chromium."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from flowkeeper import Context

from ..helpers import drive, make_fk, serve

PASSWORD = "browser-test-password"
UI = "/api/flowkeeper/ui"
log = logging.getLogger("shop.browser")


@pytest.mark.slow
async def test_logs_banner_and_overdue_run_in_the_dashboard(
    database_url: str, browser_context: Any, artifacts_dir: Path
) -> None:
    fk = make_fk(database_url, dashboard_password=PASSWORD)
    log.setLevel(logging.INFO)

    async def charge() -> str:
        log.info("charging <b>card</b> 4242")  # shown as text, never as HTML
        return "ok"

    @fk.workflow("shop")
    async def shop(ctx: Context) -> str:
        return await ctx.step("charge", charge)

    late = make_fk(database_url, endpoint=None)
    late.workflow("shop")(shop)
    async with serve(fk) as server:
        try:
            run_id = (await fk.trigger("shop")).run_id
            await drive(fk, [run_id])
            # the trigger's own kick may finish the run before drive ticks: tick once
            # so a driver is on record for the banner to report as silent
            await fk.tick()
            stuck = (await late.trigger("shop")).run_id
            conn = await asyncpg.connect(database_url)
            try:
                await conn.execute(
                    "UPDATE flowkeeper.runs SET due_at = now() - interval '20 minutes' "
                    "WHERE id = $1",
                    stuck,
                )
                await conn.execute(
                    "UPDATE flowkeeper.driver_ticks SET last_at = now() - interval '14 minutes'"
                )
            finally:
                await conn.close()
            page = await browser_context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{server.base_url}{UI}/")
            await page.fill("#password", PASSWORD)
            await page.click("#login")
            banner = page.locator("#health-banner")
            await banner.wait_for(state="visible")
            assert (await banner.inner_text()).startswith(
                "no driver has ticked for 14 min; 1 run overdue."
            )
            await page.screenshot(path=str(artifacts_dir / "health-banner.png"), full_page=True)
            await page.goto(f"{server.base_url}{UI}/runs/{run_id}")
            await page.click('tr.step[data-key="charge"]')
            logs = page.locator(".step-detail .logs")
            await logs.wait_for()
            text = await logs.inner_text()
            assert "LOGS (1)" in text.upper() and "charging <b>card</b> 4242" in text
            assert "INFO" in text and "shop.browser" in text
            await page.screenshot(path=str(artifacts_dir / "step-logs.png"), full_page=True)
            await page.goto(f"{server.base_url}{UI}/runs/{stuck}")
            overdue = page.locator("#run-overdue")
            await overdue.wait_for()
            assert "overdue: due 20 min ago and not dispatched. Is a driver running?" in (
                await overdue.inner_text()
            )
            assert errors == []
        finally:
            with contextlib.suppress(Exception):
                await late.aclose()
            with contextlib.suppress(Exception):
                await fk.aclose()
