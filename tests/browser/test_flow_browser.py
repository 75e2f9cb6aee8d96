"""Schedules, concurrency keys, storage and a queued run's reason in a real Chromium."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flowkeeper import Concurrency, Context, RateLimit

from ..helpers import make_fk, serve, wait_for

PASSWORD = "browser-test-password"
UI = "/api/flowkeeper/ui"


async def _open_run(browser_context: Any, base_url: str, run_id: str) -> tuple[Any, list[str]]:
    """A signed-in page on the run's dashboard page, and the page errors it raises."""
    page = await browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{base_url}{UI}/runs/{run_id}")
    await page.fill("#password", PASSWORD)
    await page.click("#login")
    return page, errors


@pytest.mark.slow
async def test_schedules_page_keys_storage_and_queued_reason(
    database_url: str, browser_context: Any, artifacts_dir: Path
) -> None:
    fk = make_fk(database_url, dashboard_password=PASSWORD)
    release = asyncio.Event()

    @fk.workflow("digest", cron="0 9 * * MON-FRI", timezone="Europe/Berlin")
    async def digest(ctx: Context, slot: datetime) -> None:
        return None

    @fk.workflow("exclusive", concurrency=Concurrency(limit=1, key=lambda n: f"c{n % 1}"))
    async def exclusive(ctx: Context, n: int) -> int:
        await ctx.step("hold", release.wait)
        return n

    async with serve(fk) as server:
        try:
            first = (await fk.trigger("exclusive", 1)).run_id
            second = (await fk.trigger("exclusive", 2)).run_id

            async def parked() -> bool:
                reason = (await fk.get_run(second)).status.value == "queued"
                await fk.tick()
                return reason and (await fk.get_run(first)).status.value == "running"

            await wait_for(parked)
            page, errors = await _open_run(browser_context, server.base_url, second)
            reason = page.locator("#queued-reason")
            await reason.wait_for()
            assert "waiting for a concurrency slot of wf:exclusive:c0" in await reason.inner_text()
            assert "1 of 1 held" in await reason.inner_text()

            await page.click("#nav-schedules")
            row = page.locator('tr.schedule[data-workflow="digest"]')
            await row.wait_for()
            assert "0 9 * * MON-FRI" in await row.inner_text()
            assert await row.get_attribute("data-state") == "active"
            key = page.locator('tr.key[data-key="wf:exclusive:c0"]')
            await key.wait_for()
            assert "1 / 1" in await key.inner_text()
            assert "on disk" in await page.locator("#schema-size").inner_text()
            assert await page.locator('tr.table[data-table="runs"]').count() == 1
            await page.screenshot(path=str(artifacts_dir / "schedules.png"), full_page=True)

            await row.locator('button[data-action="pause"]').click()
            await page.locator('tr.schedule[data-state="paused"]').wait_for()
            assert (await fk.schedules.list())[0].paused
            await page.locator('button[data-action="resume"]').click()
            await page.locator('tr.schedule[data-state="active"]').wait_for()
            assert errors == []
        finally:
            release.set()
            await fk.aclose()


@pytest.mark.slow
async def test_a_run_asleep_on_a_step_rate_limit_says_so(
    database_url: str, browser_context: Any, artifacts_dir: Path
) -> None:
    slow = RateLimit(1, timedelta(minutes=10))
    fk = make_fk(database_url, dashboard_password=PASSWORD, rate_limits={"provider 'ключ'": slow})

    @fk.workflow("paced")
    async def paced(ctx: Context) -> str:
        return await ctx.step("call", lambda: "ok", rate_limit="provider 'ключ'")

    async with serve(fk) as server:
        try:
            first = (await fk.trigger("paced")).run_id
            second = (await fk.trigger("paced")).run_id

            async def asleep() -> bool:
                await fk.tick()
                states = [(await fk.get_run(r)).status.value for r in (first, second)]
                return states == ["completed", "sleeping"]

            await wait_for(asleep)
            page, errors = await _open_run(browser_context, server.base_url, second)
            event = page.locator("#events li.ev-throttled")
            await event.wait_for()
            text = await event.inner_text()
            assert "step waits for rate limit “provider 'ключ'”" in text, text
            assert "call" in text and "attempt 1" in text
            await page.screenshot(path=str(artifacts_dir / "step-rate-limit.png"), full_page=True)
            assert errors == []
        finally:
            await fk.aclose()


@pytest.mark.slow
async def test_a_run_woken_late_on_a_rate_limit_says_it_took_a_new_time(
    database_url: str, browser_context: Any, artifacts_dir: Path
) -> None:
    fk = make_fk(database_url, dashboard_password=PASSWORD)

    @fk.workflow("paced", rate_limit=RateLimit(1, timedelta(minutes=10)))
    async def paced(ctx: Context) -> str:
        return "ok"

    async with serve(fk) as server:
        try:
            await fk.trigger("paced")  # takes the key's time now
            late = (await fk.trigger("paced")).run_id  # reserved 10 minutes ahead
            async with fk.store.db.acquire() as conn:  # its driver was down for an hour
                await conn.execute(
                    "UPDATE flowkeeper.runs SET throttled_until = now() - interval '1 hour', "
                    "due_at = now() WHERE id = $1::uuid",
                    late,
                )
            await fk.tick()
            page, errors = await _open_run(browser_context, server.base_url, late)
            event = page.locator("#events li.ev-throttled", has_text="woken late")
            await event.wait_for()
            assert "start throttled by" in await event.inner_text()
            assert errors == []
        finally:
            await fk.aclose()
