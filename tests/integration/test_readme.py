"""The README's "Your first workflow" runs as written: the front door must not rot."""

from __future__ import annotations

import re
import sys
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from flowkeeper.testing import FakeClock
from flowkeeper.testing.postgres import free_port

from ..helpers import KEY, Served, drive, wait_for

README = Path(__file__).resolve().parents[2] / "README.md"


def _section_blocks(title: str) -> list[str]:
    text = README.read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


async def test_first_workflow_from_the_readme(
    database_url: str,
    conn: asyncpg.Connection,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    workflows, app_code, trigger_code = _section_blocks("Your first workflow")[:3]
    assert workflows.startswith("# shop/workflows.py") and app_code.startswith("# shop/app.py")
    package = tmp_path / "shop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "workflows.py").write_text(workflows)
    (package / "app.py").write_text(app_code)
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("FLOWKEEPER_SIGNING_KEY", KEY)
    monkeypatch.setenv("FLOWKEEPER_ENDPOINT", f"http://127.0.0.1:{port}/api/flowkeeper")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "shop" or m.startswith("shop.")]:
        monkeypatch.delitem(sys.modules, name)

    from shop.app import app  # type: ignore[import-not-found]
    from shop.workflows import Order, fk  # type: ignore[import-not-found]

    clock = await FakeClock(conn).install()
    first_line = trigger_code.splitlines()[0]  # handle = await fk.trigger(...)
    namespace = {"fk": fk, "order": Order(id="o1", email="ada@example.com", amount_cents=4200)}
    try:
        async with Served(app, port):
            source = f"async def _trigger():\n    {first_line}\n    return handle\n"
            exec(compile(source, "README.md", "exec"), namespace)
            handle = await namespace["_trigger"]()  # type: ignore[operator]
            # Charged, receipt sent, now sleeping for a day.
            await wait_for(lambda: _sleeping(fk, handle.run_id))
            await clock.advance(timedelta(days=1, seconds=1))
            await drive(fk, [handle.run_id])
        assert await fk.result(handle.run_id) == "ch_o1"
    finally:
        await fk.aclose()
    out = capfd.readouterr().out
    assert "receipt for ch_o1 sent to ada@example.com" in out
    assert "review request sent to ada@example.com" in out


async def _sleeping(fk: object, run_id: str) -> bool:
    return (await fk.get_run(run_id)).status == "sleeping"  # type: ignore[attr-defined]
