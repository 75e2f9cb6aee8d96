"""Parallel branches and child runs where a user looks: dashboard API, timeline, CLI."""

from __future__ import annotations

import asyncio
from datetime import datetime

import httpx
import pytest

from flowkeeper import Context
from flowkeeper.cli import main

from ..helpers import drive, make_fk, serve

PASSWORD = "correct horse battery staple"
UI = "/api/flowkeeper/ui"


async def test_dashboard_and_cli_show_parallel_bars_children_and_parent(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fk = make_fk(database_url, dashboard_password=PASSWORD)

    async def io(tag: str) -> str:
        await asyncio.sleep(0.2)
        return tag

    @fk.workflow("kid")
    async def kid(ctx: Context, i: int) -> int:
        return i

    @fk.workflow("family")
    async def family(ctx: Context) -> int:
        await asyncio.gather(ctx.step("left", io, "l"), ctx.step("right", io, "r"))
        kids = [await ctx.start_child(f"kid:{i}", "kid", i) for i in range(3)]
        return sum(await ctx.wait_for_children(kids))

    try:
        async with serve(fk):
            handle = await fk.trigger("family")
            assert (await drive(fk, [handle.run_id]))[handle.run_id] == "completed"
            port = fk.test_port  # type: ignore[attr-defined]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                await client.post(f"{UI}/login", data={"password": PASSWORD, "next": f"{UI}/"})
                data = (await client.get(f"{UI}/api/runs/{handle.run_id}")).json()
                child_id = data["children"][0]["id"]
                child = (await client.get(f"{UI}/api/runs/{child_id}")).json()
    finally:
        await fk.aclose()
    # Parallel bars: the two branches' attempt spans overlap in time.
    lanes = {lane["key"]: lane for lane in data["timeline"]["lanes"]}
    left, right = (lanes[k]["spans"][-1] for k in ("left", "right"))
    assert datetime.fromisoformat(left["start"]) < datetime.fromisoformat(right["end"])
    assert datetime.fromisoformat(right["start"]) < datetime.fromisoformat(left["end"])
    assert data["children_total"] == 3
    assert [(c["step"], c["status"]) for c in data["children"]] == [
        (f"kid:{i}", "completed") for i in range(3)
    ]
    assert child["parent"] == {"id": handle.run_id, "step": "kid:0"}

    code = await asyncio.to_thread(
        main, ["runs", "show", handle.run_id, "--database-url", database_url]
    )
    out, _ = capsys.readouterr()
    assert code == 0
    assert "children  3 (3 completed)" in out
    assert child_id in out and "kid:0" in out
    code = await asyncio.to_thread(main, ["runs", "show", child_id, "--database-url", database_url])
    out, _ = capsys.readouterr()
    assert f"parent    {handle.run_id} (step kid:0)" in out
