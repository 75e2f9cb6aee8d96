"""A real headless Chromium (Debian's ``chromium``) driven by Playwright.

Playwright's own browser download is never used (``playwright install`` needs
the internet): it drives the system's /usr/bin/chromium.  Tests skip, naming
the package, only where that browser is missing.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("FLOWKEEPER_CHROMIUM", "/usr/bin/chromium")
HAVE_CHROMIUM = os.path.exists(CHROMIUM)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture
async def browser_context(tmp_path: Path) -> AsyncIterator[Any]:
    if not HAVE_CHROMIUM:
        pytest.skip(f"{CHROMIUM} not found: install the Debian package 'chromium'")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install -r tests/requirements.txt")
    async with async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh user-data dir per test
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1360, "height": 900},
        )
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            await context.close()
