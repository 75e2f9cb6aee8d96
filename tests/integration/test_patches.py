"""ctx.patched / ctx.deprecate_patch: code changes under live runs, deterministically."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from flowkeeper import Context, FlowKeeper
from flowkeeper.cli import main

from ..helpers import drive, make_fk, serve, wait_for

PASSWORD = "correct horse battery staple"


def step(name: str) -> Callable[[], str]:
    return lambda: name


async def v1(ctx: Context) -> list[str]:
    out = [await ctx.step("a", step("a"))]
    out.append(await ctx.step("b", step("b")))
    await ctx.sleep("pause", 0.3)
    out.append(await ctx.step("c", step("c")))
    return out


async def v2(ctx: Context) -> list[str]:
    out = [await ctx.step("a", step("a"))]
    if ctx.patched("fraud-check-v2"):
        out.append(await ctx.step("fraud-check", step("fraud")))  # b removed, a step added
    else:
        out.append(await ctx.step("b", step("b")))
    await ctx.sleep("pause", 0.3)
    out.append(await ctx.step("c", step("c")))
    return out


async def v3(ctx: Context) -> list[str]:
    out = [await ctx.step("a", step("a"))]
    ctx.deprecate_patch("fraud-check-v2")
    out.append(await ctx.step("fraud-check", step("fraud")))
    await ctx.sleep("pause", 0.3)
    out.append(await ctx.step("c", step("c")))
    return out


async def v2_unpatched(ctx: Context) -> list[str]:
    out = [await ctx.step("a", step("a"))]
    out.append(await ctx.step("fraud-check", step("fraud")))
    await ctx.sleep("pause", 0.3)
    return out


async def _sleeping_on(fn: Any, database_url: str) -> tuple[str, str]:
    """Two runs of ``fn`` started and left sleeping; (first, second) run ids."""
    fk = make_fk(database_url)
    fk.workflow("order")(fn)
    try:
        async with serve(fk):
            ids = [(await fk.trigger("order")).run_id for _ in range(2)]

            async def sleeping() -> bool:
                statuses = [(await fk.get_run(r)).status.value for r in ids]
                return statuses == ["sleeping", "sleeping"]

            await wait_for(sleeping)
    finally:
        await fk.aclose()
    return ids[0], ids[1]


async def _deploy(fn: Any, database_url: str, ids: list[str]) -> tuple[FlowKeeper, list[str]]:
    """Serve ``fn`` as the new code, start one new run, drive every run to its end."""
    fk = make_fk(database_url)
    fk.workflow("order")(fn)
    async with serve(fk):
        new = (await fk.trigger("order")).run_id
        await asyncio.sleep(0.35)
        await drive(fk, [*ids, new])
    return fk, [*ids, new]


async def markers(conn: asyncpg.Connection, run_id: str) -> list[tuple[str, str]]:
    rows = await conn.fetch(
        "SELECT key, output::text AS v FROM flowkeeper.steps WHERE run_id = $1 AND kind = 'patch'",
        run_id,
    )
    return [(r["key"], r["v"]) for r in rows]


async def test_old_runs_take_the_old_branch_new_runs_the_new(
    database_url: str, conn: asyncpg.Connection
) -> None:
    old, _ = await _sleeping_on(v1, database_url)
    fk, (old, _, new) = await _deploy(v2, database_url, [old, _])
    try:
        assert await fk.result(old) == ["a", "b", "c"]
        assert await fk.result(new) == ["a", "fraud", "c"]
        assert await markers(conn, old) == [("#patch:fraud-check-v2", "false")]
        assert await markers(conn, new) == [("#patch:fraud-check-v2", "true")]
        info = await fk.get_run(old)
        assert [s.key for s in info.steps if s.kind != "patch"] == ["a", "b", "pause", "c"]
    finally:
        await fk.aclose()


async def test_without_the_patch_the_error_points_to_it(database_url: str) -> None:
    old, _ = await _sleeping_on(v1, database_url)
    fk, _ = await _deploy(v2_unpatched, database_url, [old])
    try:
        info = await fk.get_run(old)
        assert info.status.value == "failed" and info.error is not None
        assert "DeterminismError" in info.error["type"]
        assert "ctx.patched(" in info.error["message"]
    finally:
        await fk.aclose()


async def w1(ctx: Context) -> list[str]:
    out = [await ctx.step("a", step("a")), await ctx.step("b", step("b"))]
    await ctx.sleep("pause", 0.3)
    out.append(await ctx.step("c", step("c")))
    await ctx.sleep("pause2", 1.5)
    return out


async def w2(ctx: Context) -> list[str]:
    out = [await ctx.step("a", step("a"))]
    if ctx.patched("fraud-check-v2"):
        out.append(await ctx.step("fraud-check", step("fraud")))
    else:
        out.append(await ctx.step("b", step("b")))
    await ctx.sleep("pause", 0.3)
    out.append(await ctx.step("c", step("c")))
    await ctx.sleep("pause2", 1.5)
    return out


async def w3(ctx: Context) -> list[str]:
    out = [await ctx.step("a", step("a"))]
    ctx.deprecate_patch("fraud-check-v2")
    out.append(await ctx.step("fraud-check", step("fraud")))
    await ctx.sleep("pause", 0.3)
    out.append(await ctx.step("c", step("c")))
    await ctx.sleep("pause2", 1.5)
    return out


async def test_deprecate_patch_fails_only_runs_on_the_old_branch(
    database_url: str, conn: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    old, other = await _sleeping_on(w1, database_url)
    # v2: the old runs meets the patch (old branch), a new run too (new branch); both sleep.
    fk = make_fk(database_url, dashboard_password=PASSWORD)
    fk.workflow("order")(w2)
    try:
        async with serve(fk):
            fresh = (await fk.trigger("order")).run_id

            async def recorded() -> bool:
                await fk.tick()
                return len(await markers(conn, old)) == 1 and len(await markers(conn, fresh)) == 1

            await wait_for(recorded)

            async def both_old() -> bool:
                await fk.tick()
                return len(await markers(conn, other)) == 1

            await wait_for(both_old)
            # All live: two on the old branch, one on the new; the API, the CLI and the
            # dashboard say so.
            [branches] = await fk.patch_branches("fraud-check-v2")
            assert (branches.workflow, branches.old, branches.new) == ("order", 2, 1)
            assert set(await fk.patch_runs("fraud-check-v2")) == {old, other}
            assert await fk.patch_runs("fraud-check-v2", old=False) == [fresh]
            code = await asyncio.to_thread(
                main, ["runs", "list", "--patch", "fraud-check-v2", "--database-url", database_url]
            )
            out = capsys.readouterr().out
            assert code == 0
            assert "2 live run(s) still on the old branch" in out and old in out
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{fk.test_port}") as client:  # type: ignore[attr-defined]
                await client.post(
                    "/api/flowkeeper/ui/login", data={"password": PASSWORD, "next": "/"}
                )
                body = (await client.get("/api/flowkeeper/ui/api/patches")).json()
            assert body["patches"] == [
                {"patch": "fraud-check-v2", "workflow": "order", "old": 2, "new": 1, "unreached": 0}
            ]
    finally:
        await fk.aclose()
    assert await markers(conn, old) == [("#patch:fraud-check-v2", "false")]
    fk3, (old, fresh, newest) = await _deploy(w3, database_url, [old, fresh])
    try:
        info = await fk3.get_run(old)
        assert info.status.value == "failed" and info.error is not None
        assert "old branch of patch 'fraud-check-v2'" in info.error["message"]
        assert "runs list --patch fraud-check-v2" in info.error["message"]
        assert await fk3.result(fresh) == ["a", "fraud", "c"]
        assert await fk3.result(newest) == ["a", "fraud", "c"]
        assert await markers(conn, newest) == [("#patch:fraud-check-v2", "true")]
    finally:
        await fk3.aclose()


@pytest.mark.parametrize("bad", ["", "#x", "a b", "x" * 201, "é", "fraud\x00"])
async def test_bad_patch_ids_and_one_id_for_two_changes(fk: FlowKeeper, bad: str) -> None:
    @fk.workflow("bad-id")
    async def bad_id(ctx: Context) -> bool:
        return ctx.patched(bad)

    @fk.workflow("reused")
    async def reused(ctx: Context) -> list[bool]:
        first = ctx.patched("x")
        await ctx.step("s", step("s"))
        return [first, ctx.patched("x")]

    async with serve(fk):
        ids = [(await fk.trigger(w)).run_id for w in ("bad-id", "reused")]
        await drive(fk, ids)
    for rid, needle in zip(ids, ("is not valid", "one id guards one code change"), strict=True):
        info = await fk.get_run(rid)
        assert info.status.value == "failed" and info.error is not None
        assert "StepUsageError" in info.error["type"]
        assert needle in info.error["message"]
