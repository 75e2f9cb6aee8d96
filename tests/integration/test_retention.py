"""Retention: finished runs past their period are pruned in small batches, by every tick
(and pg_cron), while runs are being created; `flowkeeper runs prune` by hand."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

from flowkeeper import ConfigurationError, Context, FlowKeeper, NonRetriableError
from flowkeeper.retention import Retention
from flowkeeper.testing import FakeClock

from ..helpers import drive, make_fk, serve


def _workflows(fk: FlowKeeper) -> None:
    @fk.workflow("ok")
    async def ok(ctx: Context, n: int) -> int:
        return await ctx.step("one", lambda: n)

    def refuse() -> None:
        raise NonRetriableError("no")

    @fk.workflow("bad")
    async def bad(ctx: Context, n: int) -> None:
        await ctx.step("one", refuse)

    @fk.workflow("short", retention=Retention(completed=timedelta(minutes=10)))
    async def short(ctx: Context, n: int) -> int:
        return n


async def test_policies_per_status_and_workflow(
    database_url: str, conn: asyncpg.Connection
) -> None:
    fk = make_fk(
        database_url,
        retention=Retention(completed=timedelta(hours=1), failed=timedelta(days=1)),
    )
    _workflows(fk)
    try:
        await fk.store.ensure_schema()
        clock = await FakeClock(conn).install()
        async with serve(fk):
            done = [(await fk.trigger("ok", i, idempotency_key=f"k{i}")).run_id for i in range(3)]
            failed = [(await fk.trigger("bad", i)).run_id for i in range(2)]
            short = [(await fk.trigger("short", i)).run_id for i in range(2)]
            await drive(fk, done + failed + short)
            # Its alert was delivered: nothing holds the failed runs back but their age.
            await fk.tick()
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM flowkeeper.alerts WHERE due_at IS NOT NULL"
                )
                == 0
            )
            await clock.advance(timedelta(minutes=30))
            assert await fk.pruner.prune() == 2  # "short" keeps completed runs 10 minutes
            await clock.advance(timedelta(minutes=31))
            await fk.tick()  # every tick prunes a batch
            left = await conn.fetch("SELECT workflow, status FROM flowkeeper.runs ORDER BY 1")
            assert [(r["workflow"], r["status"]) for r in left] == [("bad", "failed")] * 2
            # The idempotency key of a pruned run is free again (documented window).
            await clock.advance(timedelta(days=1))
            again = await fk.trigger("ok", 0, idempotency_key="k0")
            assert again.created
            await drive(fk, [again.run_id])
            await fk.pruner.prune()  # (drive's ticks may have pruned them already)
            left = await conn.fetch("SELECT id::text FROM flowkeeper.runs")
            assert [r["id"] for r in left] == [again.run_id]  # failed ones past their day
            steps = await conn.fetchval("SELECT count(*) FROM flowkeeper.steps")
            events = await conn.fetchval(
                "SELECT count(*) FROM flowkeeper.events WHERE run_id <> $1", again.run_id
            )
            assert steps == 1 and events == 0  # their history went with them
    finally:
        await fk.aclose()


async def test_pruning_while_runs_are_created(database_url: str, conn: asyncpg.Connection) -> None:
    fk = make_fk(database_url, retention=Retention(completed=timedelta(days=7)))
    _workflows(fk)
    try:
        await fk.store.ensure_schema()
        await fk.reconcile()
        # 5,000 runs finished long ago, with a step each.
        await conn.execute(
            """INSERT INTO flowkeeper.runs (id, workflow, status, created_at, finished_at)
               SELECT gen_random_uuid(), 'ok', 'completed', now() - interval '30 days',
                      now() - interval '30 days' + i * interval '1 second'
               FROM generate_series(1, 5000) AS i;
               INSERT INTO flowkeeper.steps (run_id, key, position, name, kind, status,
                                             started_at)
               SELECT id, 'one', 0, 'one', 'step', 'completed', now() FROM flowkeeper.runs"""
        )
        new: list[str] = []
        async with serve(fk):

            async def create() -> None:
                for i in range(60):
                    new.append((await fk.trigger("ok", i)).run_id)

            async def prune() -> int:
                total = 0
                while True:
                    n = await fk.pruner.prune(batch=250)
                    total += n
                    if n == 0 and len(new) >= 60:
                        return total
                    await asyncio.sleep(0)

            pruned, _ = await asyncio.gather(prune(), create())
            await drive(fk, new)
        assert pruned == 5000
        rows = await conn.fetch("SELECT id::text, status FROM flowkeeper.runs")
        assert sorted(r["id"] for r in rows) == sorted(new)
        assert {r["status"] for r in rows} == {"completed"}
    finally:
        await fk.aclose()


async def test_cli_prune_by_hand(
    fk: FlowKeeper, database_url: str, conn: asyncpg.Connection
) -> None:
    from .test_scheduler import _cli

    await fk.store.ensure_schema()
    await conn.execute(
        """INSERT INTO flowkeeper.runs (id, workflow, status, finished_at)
           SELECT gen_random_uuid(), w, s, now() - interval '40 days'
           FROM unnest(ARRAY['a', 'a', 'b']) AS w, unnest(ARRAY['completed', 'failed']) AS s"""
    )
    env = {"DATABASE_URL": database_url}
    refused = await asyncio.to_thread(
        _cli, "runs", "prune", "--older-than", "30x", "--status", "completed", "-y", env=env
    )
    assert refused.returncode == 1 and "--older-than" in refused.stderr
    done = await asyncio.to_thread(
        _cli,
        "runs",
        "prune",
        "--older-than",
        "30d",
        "--status",
        "completed",
        "-w",
        "a",
        "--batch",
        "1",
        "-y",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "deleted 2 completed run(s)" in done.stdout
    left = await conn.fetch("SELECT workflow, status FROM flowkeeper.runs ORDER BY 1, 2")
    assert [(r["workflow"], r["status"]) for r in left] == [
        ("a", "failed"),
        ("a", "failed"),
        ("b", "completed"),
        ("b", "failed"),
    ]


@pytest.mark.parametrize("bad", [0, -5, timedelta(0), "7d", float("nan")])
def test_bad_retention_is_refused(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="Retention"):
        Retention(completed=bad)  # type: ignore[arg-type]
