"""The dashboard in a real headless Chromium, against a real uvicorn and Postgres.

Log in, read a failed run's timeline, replay it from the failed step and watch
it complete live, cancel a sleeping run; and the refusals: no session, a
forged cookie, an action without its CSRF token.  Screenshots of the run page
are kept under artifacts/.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from flowkeeper import Context, FlowKeeper, RetryPolicy

from ..helpers import make_fk, serve, wait_for

PASSWORD = "browser-test-password"
UI = "/api/flowkeeper/ui"


class Shop:
    """A checkout whose card charge is broken until ``fixed``, and a long nap."""

    def __init__(self, fk: FlowKeeper) -> None:
        self.fixed = False
        # When set, a charge waits for it: the run stays running meanwhile.
        self.hold: threading.Event | None = None

        def charge(amount: int) -> dict[str, Any]:
            if not self.fixed:
                raise ConnectionError("card processor unreachable")
            if self.hold is not None:
                self.hold.wait(30)
            return {"charge_id": "ch_123", "amount": amount}

        @fk.workflow("checkout", retry=RetryPolicy(max_attempts=2, initial_delay=0.2, jitter=0))
        async def checkout(ctx: Context, amount: int) -> str:
            await ctx.step("reserve-stock", lambda: {"sku": "tea", "qty": 1})
            charged = await ctx.step("charge-card", charge, amount)
            await ctx.step("send-receipt", lambda: "sent")
            return str(charged["charge_id"])

        @fk.workflow("follow-up")
        async def follow_up(ctx: Context) -> None:
            await ctx.step("note", lambda: "noted")
            await ctx.sleep("wait-a-day", timedelta(days=1))
            await ctx.step("ask-for-review", lambda: "asked")


@contextlib.asynccontextmanager
async def running_app(database_url: str) -> AsyncIterator[tuple[FlowKeeper, Shop, str]]:
    """The app served by uvicorn, and a scheduler loop ticking every 200 ms."""
    fk = make_fk(database_url, dashboard_password=PASSWORD)
    shop = Shop(fk)

    async def scheduler() -> None:
        while True:
            await fk.tick()
            await asyncio.sleep(0.2)

    async with serve(fk) as server:
        ticker = asyncio.create_task(scheduler())
        try:
            yield fk, shop, server.base_url
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await fk.aclose()


async def _status(fk: FlowKeeper, run_id: str, status: str) -> bool:
    return (await fk.get_run(run_id)).status == status


async def _log_in(page: Any, base: str) -> None:
    await page.goto(f"{base}{UI}/")
    await page.fill("#password", PASSWORD)
    await page.click("#login")
    await page.wait_for_selector("table#runs tbody tr.row")


@pytest.mark.slow
async def test_failed_run_timeline_replay_live_and_cancel_a_sleeping_run(
    database_url: str, browser_context: Any, artifacts_dir: Path
) -> None:
    async with running_app(database_url) as (fk, shop, base):
        failed = (await fk.trigger("checkout", 250, idempotency_key="order-17")).run_id
        napping = (await fk.trigger("follow-up")).run_id
        await wait_for(lambda: _status(fk, failed, "failed"))
        await wait_for(lambda: _status(fk, napping, "sleeping"))

        page = await browser_context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await _log_in(page, base)

        # The list: newest first, counts per status.
        rows = page.locator("table#runs tbody tr.row")
        assert await rows.count() == 2
        assert await rows.nth(0).get_attribute("data-id") == napping
        assert await page.inner_text(".pill.p-failed b") == "1"
        await page.click(f'tr.row[data-id="{failed}"] a')

        # The failed run: timeline with both failed attempts, the backoff between, the error.
        await page.wait_for_selector("#run-status .badge.s-failed")
        assert await page.inner_text("#run-id") == failed
        lane = page.locator('.tl-row[data-key="charge-card"]')
        assert await lane.locator(".bar.o-failed").count() == 2
        assert await lane.locator(".bar.o-waiting").count() == 1
        assert await page.locator('.tl-row[data-key="reserve-stock"] .bar.o-completed').count() == 1
        assert "card processor unreachable" in await page.inner_text("#run-error")
        await page.click('tr.step[data-key="charge-card"] td.mono')  # open the step's details
        detail = await page.inner_text("tr.detail")
        assert "failed attempts" in detail.lower() and "250" in detail  # its input, pretty-printed
        await page.screenshot(path=str(artifacts_dir / "dashboard-run-failed.png"), full_page=True)

        # The fix is deployed; replay from the failed step, confirmed, and watch it finish.
        shop.fixed = True
        await page.click("#replay-failed-step")
        await page.wait_for_selector("dialog#confirm[open]")
        assert "charge-card" in await page.inner_text("#confirm-text")
        await page.fill("#confirm-reason", "processor is back")
        await page.click("#confirm-yes")
        await page.wait_for_selector("#run-status .badge.s-completed", timeout=20_000)
        assert await page.locator("tr.step").count() == 3
        assert await page.inner_text("#run-output") == '"ch_123"'
        history = await page.inner_text("#events")
        assert "replayed" in history and "processor is back" in history
        await page.screenshot(
            path=str(artifacts_dir / "dashboard-run-replayed.png"), full_page=True
        )
        info = await fk.get_run(failed)
        assert info.status == "completed"
        assert [s.key for s in info.steps] == ["reserve-stock", "charge-card", "send-receipt"]
        assert info.steps[0].attempts == 1  # kept, not run again

        # A sleeping run: its sleep drawn as a span; cancel it.
        await page.goto(f"{base}{UI}/runs/{napping}")
        await page.wait_for_selector("#run-status .badge.s-sleeping")
        assert await page.locator('.tl-row[data-key="wait-a-day"] .bar.o-sleeping').count() == 1
        await page.click("#cancel")
        await page.click("#confirm-yes")
        await page.wait_for_selector("#run-status .badge.s-cancelled")
        assert (await fk.get_run(napping)).status == "cancelled"
        assert errors == []


# In the page: the first GET of the run after a replay gets its body late, so the
# polls that follow it answer first (a slow network or a busy browser).
_SLOW_AFTER_REPLAY = """
(() => {
  const fetch0 = window.fetch;
  let slow = false;
  window.fetch = async (url, options = {}) => {
    const response = await fetch0(url, options);
    const path = new URL(String(url), location.href).pathname;
    if (options.method === "POST" && path.endsWith("/replay")) slow = true;
    else if (slow && /\\/api\\/runs\\/[^/]+$/.test(path) && response.status === 200) {
      slow = false;
      window.__slowAnswer = "late";
      const body = await response.json();
      return new Proxy(response, { get: (target, name) => name === "json"
        ? () => new Promise((done) => setTimeout(() => { window.__slowAnswer = "in"; done(body); }, 3000))
        : (typeof target[name] === "function" ? target[name].bind(target) : target[name]) });
    }
    return response;
  };
})();
"""


@pytest.mark.slow
async def test_an_answer_that_arrives_late_does_not_hide_a_newer_state(
    database_url: str, browser_context: Any
) -> None:
    async with running_app(database_url) as (fk, shop, base):
        failed = (await fk.trigger("checkout", 250)).run_id
        await wait_for(lambda: _status(fk, failed, "failed"))
        page = await browser_context.new_page()
        await _log_in(page, base)
        await page.goto(f"{base}{UI}/runs/{failed}")
        await page.wait_for_selector("#run-status .badge.s-failed")
        await page.evaluate(_SLOW_AFTER_REPLAY)

        # Replay; the refresh that follows it sees the run running, and is late.
        shop.fixed, shop.hold = True, threading.Event()
        await page.click("#replay-failed-step")
        await page.fill("#confirm-reason", "processor is back")
        await page.click("#confirm-yes")
        await page.wait_for_function("() => window.__slowAnswer === 'late'")
        await wait_for(lambda: _status(fk, failed, "running"))
        shop.hold.set()
        # The polls show the run completed, then the late (older) answer comes in.
        await page.wait_for_selector("#run-status .badge.s-completed", timeout=20_000)
        await page.wait_for_function("() => window.__slowAnswer === 'in'", timeout=10_000)
        await asyncio.sleep(2)  # more than a poll: the page had every chance to refetch
        assert await page.locator("#run-status .badge.s-completed").count() == 1


@pytest.mark.slow
async def test_refuses_without_login_forged_cookie_and_missing_csrf(
    database_url: str, browser_context: Any
) -> None:
    async with running_app(database_url) as (fk, _shop, base):
        napping = (await fk.trigger("follow-up")).run_id
        await wait_for(lambda: _status(fk, napping, "sleeping"))
        page = await browser_context.new_page()

        # No session: any page leads to the sign-in form, remembering where to go.
        await page.goto(f"{base}{UI}/runs/{napping}")
        await page.wait_for_selector("#password")
        assert "/login?next=" in page.url
        wrong = await page.goto(f"{base}{UI}/runs/{napping}")
        assert wrong is not None
        await page.fill("#password", "not-the-password")
        await page.click("#login")
        assert "Wrong password" in await page.inner_text("#login-error")

        # A cookie that was not signed by this deployment is ignored.
        await browser_context.add_cookies(
            [{"name": "flowkeeper_session", "value": "eyJjc3JmIjoieCJ9.Zz.forged", "url": base}]
        )
        await page.goto(f"{base}{UI}/")
        await page.wait_for_selector("#password")

        # Signed in, an action without the CSRF token is refused and changes nothing.
        await _log_in(page, base)
        response = await page.request.post(f"{base}{UI}/api/runs/{napping}/cancel", data="{}")
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "csrf"
        assert (await fk.get_run(napping)).status == "sleeping"
        # And the page's own button (which sends it) works.
        await page.goto(f"{base}{UI}/runs/{napping}")
        await page.click("#cancel")
        await page.click("#confirm-yes")
        await page.wait_for_selector("#run-status .badge.s-cancelled")


@pytest.mark.slow
async def test_a_retrying_run_is_not_shown_as_failed(
    database_url: str, browser_context: Any
) -> None:
    async with running_app(database_url) as (fk, _shop, base):

        def flaky() -> None:
            raise ConnectionError("provider timed out")

        @fk.workflow("flaky", retry=RetryPolicy(max_attempts=3, initial_delay=3600))
        async def flaky_wf(ctx: Context) -> None:
            await ctx.step("call-provider", flaky)

        run_id = (await fk.trigger("flaky")).run_id
        await wait_for(lambda: _status(fk, run_id, "retrying"))
        page = await browser_context.new_page()
        await _log_in(page, base)
        await page.goto(f"{base}{UI}/runs/{run_id}")
        await page.wait_for_selector("#run-status .badge.s-retrying")
        banner = await page.inner_text("#run-error h2")
        assert banner.startswith("Retrying") and "Failed" not in banner
        assert "call-provider" in banner and "next attempt" in banner
        assert "provider timed out" in await page.inner_text("#run-error")
        # The timeline's axis labels never overlap (the start, the offsets, "now").
        await page.wait_for_selector(".tl-axis .tick.now")
        overlaps = await page.evaluate(
            """() => {
              const r = [...document.querySelectorAll('.tl-axis .tick')]
                .filter((t) => getComputedStyle(t).visibility !== 'hidden')
                .map((t) => t.getBoundingClientRect());
              let n = 0;
              for (let i = 0; i < r.length; i++) for (let j = i + 1; j < r.length; j++)
                if (r[i].left < r[j].right && r[j].left < r[i].right) n++;
              return [n, r.length];
            }"""
        )
        assert overlaps[0] == 0 and overlaps[1] >= 2, overlaps
