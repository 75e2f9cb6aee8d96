"""Waits and events in a real headless Chromium, against a real uvicorn and Postgres.

A run waiting for an event shows its wait as a span with what it awaits and
until when; once the event arrives the span is resolved and links to the
event's page, which names the run it woke and links back; the Events page
(from the nav) lists the event and finds it by name.  Screenshots are kept
under artifacts/.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from flowkeeper import Context, FlowKeeper

from ..helpers import make_fk, serve, wait_for

PASSWORD = "browser-test-password"
UI = "/api/flowkeeper/ui"


@contextlib.asynccontextmanager
async def running_app(database_url: str) -> AsyncIterator[tuple[FlowKeeper, str]]:
    fk = make_fk(database_url, dashboard_password=PASSWORD)

    @fk.workflow("fulfil")
    async def fulfil(ctx: Context, order: int) -> str:
        await ctx.step("reserve-stock", lambda: {"sku": "tea"})
        paid = await ctx.wait_for_event(
            "wait-for-payment",
            event="invoice.paid",
            match={"order_id": order},
            timeout=timedelta(hours=2),
        )
        await ctx.step("ship", lambda: "shipped")
        return f"shipped after {paid['amount']}"

    async def scheduler() -> None:
        while True:
            await fk.tick()
            await asyncio.sleep(0.2)

    async with serve(fk) as server:
        ticker = asyncio.create_task(scheduler())
        try:
            yield fk, server.base_url
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await fk.aclose()


async def _status(fk: FlowKeeper, run_id: str, status: str) -> bool:
    return (await fk.get_run(run_id)).status == status


@pytest.mark.slow
async def test_a_wait_then_its_event_and_the_events_page(
    database_url: str, browser_context: Any, artifacts_dir: Path
) -> None:
    async with running_app(database_url) as (fk, base):
        run_id = (await fk.trigger("fulfil", 42)).run_id
        await wait_for(lambda: _status(fk, run_id, "waiting"))
        other = await fk.send_event("invoice.paid", {"order_id": 7, "amount": 1})

        page = await browser_context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{base}{UI}/runs/{run_id}")
        await page.fill("#password", PASSWORD)
        await page.click("#login")

        # Waiting: the badge, the facts, and the wait's span captioned on its lane.
        await page.wait_for_selector("#run-status .badge.s-waiting")
        facts = await page.inner_text("#waiting-for")
        assert "invoice.paid {order_id: 42}" in facts and "until" in facts
        lane = page.locator('.tl-row[data-key="wait-for-payment"]')
        assert await lane.locator(".bar.o-wait.w-waiting").count() == 1
        caption = await lane.locator(".wait-caption").inner_text()
        assert "waiting for" in caption and "invoice.paid {order_id: 42}" in caption
        assert "until" in caption
        assert await lane.locator("a.wait-event").count() == 0
        await page.screenshot(path=str(artifacts_dir / "events-run-waiting.png"), full_page=True)

        # The event arrives: the page updates live, the span links to the event.
        sent = await fk.send_event("invoice.paid", {"order_id": 42, "amount": 990})
        assert sent.woken == [run_id]
        await page.wait_for_selector("#run-status .badge.s-completed", timeout=20_000)
        assert await lane.locator(".bar.o-wait.w-completed").count() == 1
        link = lane.locator("a.wait-event")
        assert await link.inner_text() == f"event #{sent.id}"
        assert (await link.get_attribute("href") or "").endswith(f"{UI}/events/{sent.id}")
        await page.click('tr.step[data-key="wait-for-payment"] td.mono')
        detail = await page.inner_text("tr.detail")
        assert f"event #{sent.id}" in detail and "990" in detail
        await page.screenshot(path=str(artifacts_dir / "events-run-resolved.png"), full_page=True)

        # Its event: the data, and the run it woke, linked back.
        await link.click()
        await page.wait_for_selector("#event-name")
        assert await page.inner_text("#event-name") == "invoice.paid"
        assert "990" in await page.inner_text("#event-data")
        row = page.locator(f'#effects tr.effect[data-run="{run_id}"]')
        assert await row.get_attribute("data-outcome") == "woke"
        assert "wait-for-payment" in await row.inner_text()
        await page.screenshot(path=str(artifacts_dir / "events-event.png"), full_page=True)
        await row.locator("a").click()
        await page.wait_for_selector("#run-status .badge.s-completed")
        assert await page.inner_text("#run-id") == run_id

        # The Events page from the nav: newest first; the search by name finds both.
        await page.click("#nav-events")
        await page.wait_for_selector("#event-list tr.event-row")
        numbers = await page.locator("#event-list tr.event-row").evaluate_all(
            "rows => rows.map(r => r.dataset.number)"
        )
        assert numbers == [str(sent.id), str(other.id)]
        first = page.locator(f'#event-list tr.event-row[data-number="{sent.id}"]')
        cells = await first.locator("td").all_inner_texts()
        assert cells[1] == "invoice.paid" and cells[5] == "1"  # woke one run
        await page.screenshot(path=str(artifacts_dir / "events-list.png"), full_page=True)
        await page.fill("#f-name", "no.such.event")
        await page.click("#event-filters button[type=submit]")
        await page.wait_for_selector("#event-list td.empty")
        assert "name=no.such.event" in page.url
        await page.fill("#f-name", "invoice.paid")
        await page.click("#event-filters button[type=submit]")
        await page.wait_for_selector("#event-list tr.event-row")
        assert await page.locator("#event-list tr.event-row").count() == 2

        # A refused filter shows its reason on the page.
        response = await page.goto(f"{base}{UI}/events?before=soon")
        assert response is not None and response.status == 400
        assert "whole number" in await page.inner_text("#list-error")
        assert errors == []
