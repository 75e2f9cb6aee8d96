"""``flowkeeper runs ...`` against a real database and endpoint."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from flowkeeper import Context, FlowKeeper, NonRetriableError
from flowkeeper.cli import main

from ..helpers import KEY, drive, make_fk, serve, wait_for


async def _cli(
    capsys: pytest.CaptureFixture[str], database_url: str, *argv: str
) -> tuple[int, str, str]:
    """Run the CLI in a thread (it has its own event loop), as a user would."""
    code = await asyncio.to_thread(main, [*argv, "--database-url", database_url])
    out, err = capsys.readouterr()
    return code, out, err


def _shop(fk: FlowKeeper, broken: set[str], calls: Counter[str]) -> None:
    def body(name: str) -> str:
        calls[name] += 1
        if name in broken:
            raise NonRetriableError(f"{name} failed")
        return name

    @fk.workflow("shop")
    async def shop(ctx: Context, n: int) -> int:
        for name in ("pick", "pack", "ship"):
            await ctx.step(name, body, name)
        return n


async def test_list_show_replay_cancel(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOWKEEPER_SIGNING_KEY", raising=False)
    monkeypatch.delenv("FLOWKEEPER_ENDPOINT", raising=False)
    fk = make_fk(database_url)
    broken, calls = {"pack"}, Counter[str]()
    _shop(fk, broken, calls)

    @fk.workflow("sleepy")
    async def sleepy(ctx: Context) -> None:
        await ctx.sleep("nap", 3600)

    try:
        async with serve(fk):
            failed = (await fk.trigger("shop", 1, idempotency_key="order-9")).run_id
            await drive(fk, [failed])
            broken.clear()
            ok = (await fk.trigger("shop", 2)).run_id
            await drive(fk, [ok])
            sleeping = (await fk.trigger("sleepy")).run_id
            await wait_for(lambda: _status(fk, sleeping, "sleeping"))

            code, out, _ = await _cli(capsys, database_url, "runs", "list")
            assert code == 0
            lines = out.splitlines()
            assert lines[0].startswith("3 runs in range")
            assert "failed 1" in lines[0] and "completed 1" in lines[0]
            assert lines[1].split()[:3] == ["STATUS", "RUN", "WORKFLOW"]
            assert [line.split()[1] for line in lines[2:]] == [sleeping, ok, failed]  # newest first
            assert "NonRetriableError: pack failed" in lines[4]

            code, out, _ = await _cli(capsys, database_url, "runs", "list", "--status", "failed")
            assert [line.split()[1] for line in out.splitlines()[2:]] == [failed]
            code, out, _ = await _cli(
                capsys, database_url, "runs", "list", "-q", "order-9", "--json"
            )
            assert '"id": "' + failed in out
            code, out, err = await _cli(capsys, database_url, "runs", "list", "--since", "soon")
            assert code == 1 and "30m, 6h" in err

            code, out, _ = await _cli(capsys, database_url, "runs", "show", failed)
            assert code == 0
            assert "status    failed" in out and "key       order-9" in out
            assert "error     flowkeeper.errors.NonRetriableError at step pack: pack failed" in out
            timeline = [line for line in out.splitlines() if line.startswith(("pick ", "pack "))]
            assert len(timeline) == 2
            assert "█" in timeline[0] and "completed" in timeline[0]
            assert "X" in timeline[1] and "failed" in timeline[1]

            # Not at a terminal: an action needs --yes, and nothing happens without it.
            code, _, err = await _cli(capsys, database_url, "runs", "replay", failed)
            assert code == 1 and "--yes" in err
            assert (await fk.get_run(failed)).status == "failed"

            # No signing key here: the replay is left due for the scheduler, which runs it.
            code, out, _ = await _cli(
                capsys, database_url, "runs", "replay", failed, "--yes", "--reason", "fixed pack"
            )
            assert code == 0 and "due for the next scheduler tick" in out
            assert (await drive(fk, [failed]))[failed] == "completed"
            assert calls["pick"] == 2  # once per run: kept on replay
            code, out, _ = await _cli(capsys, database_url, "runs", "show", failed)
            assert "replayed" in out and "fixed pack" in out and '"by": "cli"' in out

            code, out, _ = await _cli(capsys, database_url, "runs", "cancel", sleeping, "-y")
            assert code == 0 and "cancelled" in out
            assert (await fk.get_run(sleeping)).status == "cancelled"
            code, out, _ = await _cli(capsys, database_url, "runs", "cancel", sleeping, "-y")
            assert code == 1 and "already finished" in out
            code, _, err = await _cli(capsys, database_url, "runs", "retry", ok, "-y")
            assert code == 1 and "retry applies to a failed run" in err
    finally:
        await fk.aclose()


async def test_bulk_replay_pushes_with_the_signing_key(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fk = make_fk(database_url)
    broken, calls = {"ship"}, Counter[str]()
    _shop(fk, broken, calls)
    monkeypatch.setenv("FLOWKEEPER_SIGNING_KEY", KEY)
    monkeypatch.setenv("FLOWKEEPER_ENDPOINT", fk.dispatcher.endpoint)  # type: ignore[union-attr]
    try:
        async with serve(fk):
            ids = [(await fk.trigger("shop", i)).run_id for i in range(2)]
            await drive(fk, ids)
            broken.clear()
            code, out, _ = await _cli(
                capsys, database_url, "runs", "replay", "--failed", "--workflow", "shop", "--yes"
            )
            assert code == 0 and "replaying 2 failed runs of shop" in out
            # Pushed: they finish without any tick.
            for rid in ids:
                assert await fk.result(rid, timeout=10) in (0, 1)
    finally:
        await fk.aclose()


async def _status(fk: FlowKeeper, run_id: str, status: str) -> bool:
    return (await fk.get_run(run_id)).status == status
