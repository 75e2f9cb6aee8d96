"""Group commit: concurrent writes share a transaction and lose none of a lone write's rules.

Each test forces batches (a pool of one or two connections, many writes at
once) on a real PostgreSQL, then checks what a lone write guarantees: a
refused value reaches only its own write, a stale lease is fenced alone,
duplicate triggers crossing each other never fail, a caller that stops
waiting still has its write land, and a workload's recorded results are
identical with group commit on and off.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from flowkeeper import Context, DatabaseRefusedError, FlowKeeper, RetryPolicy
from flowkeeper.store import Store

from ..helpers import KEY, drive, make_fk, serve, shape

LEASE = timedelta(seconds=30)
FAST = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.01)


def _group(store: Store) -> Any:
    return store._group()


async def _claimed_runs(store: Store, count: int) -> dict[str, uuid.UUID]:
    """``count`` runs created leased to this process: their lease tokens by run id."""
    tokens: dict[str, uuid.UUID] = {}
    for _ in range(count):
        run_id, token = str(uuid.uuid4()), uuid.uuid4()
        claimed = await store.create_claimed(
            run_id=run_id, workflow="w", input_json="null", idempotency_key=None,
            lease_token=token, lease=LEASE,
        )  # fmt: skip
        assert not isinstance(claimed, tuple)
        tokens[run_id] = token
    return tokens


async def test_a_refused_value_reaches_only_its_own_write(database_url: str) -> None:
    fk = FlowKeeper(database_url, signing_key=KEY, pool_size=1)
    try:
        store = fk.store
        await store.ensure_schema()
        good = [str(uuid.uuid4()) for _ in range(30)]
        bad = str(uuid.uuid4())

        async def insert(run_id: str, text: str) -> tuple[str, bool]:
            return await store.insert_run(
                run_id=run_id,
                workflow="w",
                input_json=text,
                idempotency_key=None,
                lease_token=None,
                lease=timedelta(0),
            )

        calls = [insert(r, '{"ok": 1}') for r in good[:15]]
        calls.append(insert(bad, '{"not json'))  # Postgres refuses it: 22P02
        calls += [insert(r, '{"ok": 2}') for r in good[15:]]
        results = await asyncio.gather(*calls, return_exceptions=True)

        refused = results[15]
        assert isinstance(refused, DatabaseRefusedError), refused
        assert [r for i, r in enumerate(results) if i != 15] == [(r, True) for r in good]
        assert _group(store).batches >= 1, "the writes never shared a transaction"
        async with fk.db.acquire() as conn:
            ids = {str(r["id"]) for r in await conn.fetch("SELECT id FROM flowkeeper.runs")}
        assert ids == set(good)
    finally:
        await fk.aclose()


async def test_a_refused_input_in_merged_creates_reaches_only_its_own_run(
    database_url: str,
) -> None:
    # The endpoint's creates of runs handed over by trigger() go as one statement.
    fk = FlowKeeper(database_url, signing_key=KEY, pool_size=1)
    try:
        store = fk.store
        await store.ensure_schema()
        ids = [str(uuid.uuid4()) for _ in range(30)]
        bad = ids[11]

        async def create(run_id: str) -> Any:
            return await store.create_claimed(
                run_id=run_id, workflow="w", input_json='{"not json' if run_id == bad else "[1]",
                idempotency_key=f"key-{run_id}", lease_token=uuid.uuid4(), lease=LEASE,
            )  # fmt: skip

        results = dict(
            zip(ids, await asyncio.gather(*map(create, ids), return_exceptions=True), strict=True)
        )
        assert _group(store).batches >= 1, "the creates never shared a statement"
        assert isinstance(results.pop(bad), DatabaseRefusedError)
        assert {r: c.run_id for r, c in results.items()} == {r: r for r in results}
        async with fk.db.acquire() as conn:
            rows = await conn.fetch("SELECT id, input::text AS i FROM flowkeeper.runs")
        assert {str(r["id"]): r["i"] for r in rows} == {r: "[1]" for r in results}
    finally:
        await fk.aclose()


async def test_a_stale_lease_in_a_batch_is_fenced_alone(database_url: str) -> None:
    fk = FlowKeeper(database_url, signing_key=KEY, pool_size=1)
    try:
        store = fk.store
        await store.ensure_schema()
        tokens = await _claimed_runs(store, 40)
        stale = set(list(tokens)[::3])

        async def finish(run_id: str) -> Any:
            token = uuid.uuid4() if run_id in stale else tokens[run_id]
            return await store.commit(run_id, token, status="completed", output='"done"')

        results = dict(zip(tokens, await asyncio.gather(*map(finish, tokens)), strict=True))
        assert _group(store).batches >= 1
        assert {r for r, ok in results.items() if ok is False} == stale
        async with fk.db.acquire() as conn:
            rows = await conn.fetch("SELECT id, status FROM flowkeeper.runs")
        status = {str(r["id"]): r["status"] for r in rows}
        assert {r for r, s in status.items() if s == "completed"} == set(tokens) - stale
        assert {r for r, s in status.items() if s == "running"} == stale
    finally:
        await fk.aclose()


async def test_a_refused_step_in_one_merged_statement_reaches_only_its_own_run(
    database_url: str,
) -> None:
    # Lean step writes of different runs go as one statement, without BEGIN and
    # COMMIT: the refusal of one value must still roll back the statement whole,
    # leave the connection usable, and reach only its own run when each is sent
    # again alone.
    from flowkeeper.store import StepRecord

    fk = FlowKeeper(database_url, signing_key=KEY, pool_size=1)
    try:
        store = fk.store
        await store.ensure_schema()
        tokens = await _claimed_runs(store, 30)
        bad = list(tokens)[17]
        now = await store.clock_now()

        def record(run_id: str) -> StepRecord:
            return StepRecord(
                key="s", position=0, name="s", kind="step", status="completed", input=None,
                output='{"not json' if run_id == bad else '"fine\\u0000"', output_type=None,
                error=None, attempts=1, started_at=now, finished_at=now,
            )  # fmt: skip

        async def write(run_id: str) -> Any:
            return await store.commit(
                run_id, tokens[run_id], status="running", keep_due=True, steps=[record(run_id)]
            )

        results = dict(
            zip(tokens, await asyncio.gather(*map(write, tokens), return_exceptions=True),
                strict=True)
        )  # fmt: skip
        assert _group(store).batches >= 1, "the writes never shared a statement"
        assert isinstance(results.pop(bad), DatabaseRefusedError)
        assert all(not isinstance(r, BaseException) and r is not False for r in results.values())
        async with fk.db.acquire() as conn:
            rows = await conn.fetch("SELECT run_id, output::text AS o FROM flowkeeper.steps")
        assert {str(r["run_id"]): r["o"] for r in rows} == {r: '"fine\\u0000"' for r in results}
        # The one connection came back usable: the refused run can still write.
        assert await store.commit(bad, tokens[bad], status="completed", output="1") is not False
    finally:
        await fk.aclose()


async def test_duplicate_triggers_crossing_each_other_never_fail(database_url: str) -> None:
    # Two batches inserting the same idempotency keys in opposite orders can
    # deadlock; the batch that Postgres rolls back is sent again write by write.
    fk = FlowKeeper(database_url, signing_key=KEY, pool_size=2)

    @fk.workflow("w")
    async def w(ctx: Context, n: int) -> None:
        return None

    try:
        keys = [f"key-{i}" for i in range(25)]
        for _ in range(4):
            order = [k for pair in zip(keys, reversed(keys), strict=True) for k in pair]
            handles = await asyncio.gather(
                *(fk.trigger("w", i, idempotency_key=k) for i, k in enumerate(order))
            )
            by_key: dict[str, set[str]] = {}
            for handle, key in zip(handles, order, strict=True):
                by_key.setdefault(key, set()).add(handle.run_id)
            assert all(len(ids) == 1 for ids in by_key.values()), by_key
        async with fk.db.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == len(keys)
    finally:
        await fk.aclose()


async def test_a_write_whose_caller_stopped_waiting_still_lands(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    fk = FlowKeeper(database_url, signing_key=KEY, pool_size=1)
    try:
        store = fk.store
        await store.ensure_schema()
        ids = [str(uuid.uuid4()) for _ in range(20)]
        tasks = [
            asyncio.create_task(
                store.insert_run(
                    run_id=r,
                    workflow="w",
                    input_json="1",
                    idempotency_key=None,
                    lease_token=None,
                    lease=timedelta(0),
                )
            )
            for r in ids
        ]
        await asyncio.sleep(0)  # all submitted: one in flight, the rest queued
        for task in tasks[5:]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(50):
            await asyncio.sleep(0.02)
            async with fk.db.acquire() as conn:
                n = await conn.fetchval("SELECT count(*) FROM flowkeeper.runs")
            if n == len(ids):
                break
        assert n == len(ids)
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            gc.collect()
            await asyncio.sleep(0)
        assert "never retrieved" not in caplog.text
    finally:
        await fk.aclose()


@pytest.mark.parametrize("runs", [120])
async def test_results_are_identical_with_group_commit_on_and_off(pg: Any, runs: int) -> None:
    values: list[Any] = [
        1e16,
        -0.0,
        {"b": 1, "a": [1.5, "é", None]},
        "\u2028 \U0001f600",
        [[[]]],
        2**63,
    ]

    async def workload(
        url: str, group_commit: bool, lean: bool = True
    ) -> tuple[dict[int, Any], int]:
        fk = make_fk(url, group_commit=group_commit, pool_size=2)
        fk.store.lean_commit = lean  # off: every write takes the full commit statement
        tried: set[int] = set()

        def flaky(n: int) -> int:
            if n % 5 == 0 and n not in tried:  # a failed attempt: a commit with an event
                tried.add(n)
                raise RuntimeError(f"first attempt of {n}")
            return n

        @fk.workflow("three")
        async def three(ctx: Context, n: int) -> Any:
            a = await ctx.step("a", lambda: values[n % len(values)])
            b = await ctx.step("b", lambda: {"n": n, "a": a})
            c = await ctx.step("flaky", flaky, n, retry=FAST)
            return await ctx.step("c", lambda: [b, a, c])

        try:
            async with serve(fk):
                handles = await asyncio.gather(*(fk.trigger("three", n) for n in range(runs)))
                statuses = await drive(fk, [h.run_id for h in handles], timeout=60)
                assert set(statuses.values()) == {"completed"}
                out = {}
                for n, h in enumerate(handles):
                    info = await fk.get_run(h.run_id)
                    out[n] = shape(
                        (
                            info.output,
                            [(s.output, s.attempts, len(s.failed_attempts)) for s in info.steps],
                        )
                    )
                return out, _group(fk.store).batches if group_commit else 0
        finally:
            await fk.aclose()

    admin = await asyncpg.connect(pg.url)
    try:
        for name in ("gc_on", "gc_off", "gc_full"):
            await admin.execute(f"DROP DATABASE IF EXISTS {name}")
            await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    on, batches = await workload(pg.dsn("gc_on"), True)
    off, _ = await workload(pg.dsn("gc_off"), False)
    full, _ = await workload(pg.dsn("gc_full"), True, lean=False)
    assert batches > 0, "group commit never combined writes: the test proves nothing"
    assert on == off == full


async def test_a_deadlocked_batch_is_rolled_back_whole_and_sent_again(database_url: str) -> None:
    from flowkeeper.groupcommit import BatchRefused

    fk = FlowKeeper(database_url, signing_key=KEY, pool_size=2)
    other = await asyncpg.connect(database_url)
    try:
        store = fk.store
        await store.ensure_schema()

        def args(key: str) -> tuple[Any, ...]:
            return store.insert_args(
                run_id=str(uuid.uuid4()),
                workflow="w",
                input_json="1",
                idempotency_key=key,
                lease_token=None,
                lease=timedelta(0),
            )

        def insert(key: str) -> tuple[str, tuple[Any, ...]]:
            return ("insert_run", args(key))

        # Another transaction holds k1 and then wants k0, which the batch holds
        # while it waits for k1: a deadlock, of which the batch (waiting first,
        # and with the shorter deadlock_timeout) is the victim.
        await other.execute("SET deadlock_timeout = '10s'")
        tx = other.transaction()
        await tx.start()
        await other.execute(store.q["insert_run"], *args("k1"))
        batch = asyncio.create_task(store._call_many([insert("k0"), insert("k1")]))
        await asyncio.sleep(0.3)
        blocked = asyncio.create_task(other.execute(store.q["insert_run"], *args("k0")))
        with pytest.raises(BatchRefused):
            await batch
        await blocked
        await tx.commit()
        async with fk.db.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == 2
    finally:
        await other.close()
        await fk.aclose()
