"""Large payloads are stored compressed with lz4 (where the server has it), and read back exact."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flowkeeper import Context, DatabaseError, FlowKeeper
from flowkeeper import store as store_module
from flowkeeper.serialization import dumps
from flowkeeper.store import StepRecord

from ..helpers import KEY
from .test_replay_values import finish


@pytest.fixture
async def fk(database_url: str) -> AsyncIterator[FlowKeeper]:
    instance = FlowKeeper(database_url, signing_key=KEY)
    try:
        yield instance
    finally:
        await instance.aclose()


async def test_a_large_step_result_is_stored_with_lz4_and_read_back_exact(fk: FlowKeeper) -> None:
    async with fk.db.acquire() as conn:
        has_lz4 = await conn.fetchval(
            "SELECT 'lz4' = ANY (enumvals) FROM pg_settings "
            "WHERE name = 'default_toast_compression'"
        )
    if not has_lz4:  # pragma: no cover - every packaged server here has it
        pytest.fail("this PostgreSQL has no lz4: the migration's other branch is untested")
    words = " ".join(f"word{i % 997}" for i in range(200_000))

    @fk.workflow("big")
    async def big(ctx: Context) -> int:
        text = await ctx.step("make", lambda: {"text": words, "n": 1e16})
        return len(text["text"])

    handle = await fk.trigger("big")
    await finish(fk, handle.run_id)
    async with fk.db.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT pg_column_compression(output) AS how, pg_column_size(output) AS stored, "
            "octet_length(output::text) AS size, output::text AS text "
            "FROM flowkeeper.steps WHERE run_id = $1 AND key = 'make'",
            uuid.UUID(handle.run_id),
        )
    assert row["how"] == "lz4"
    assert row["stored"] < row["size"] / 3
    assert row["text"] == dumps({"text": words, "n": 1e16}, what="x")
    assert (await fk.get_run(handle.run_id)).output == len(words)


@pytest.fixture
def small_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    # The staged path with small sizes: outputs over 300 KB, in 64 K-character chunks.
    monkeypatch.setattr(store_module, "STAGE_ABOVE", 300_000)
    monkeypatch.setattr(store_module, "CHUNK", 65_536)


async def test_a_staged_output_is_put_together_exact(fk: FlowKeeper, small_stages: None) -> None:
    # Multi-byte characters on every chunk boundary, and a key needing quotes.
    text = ('é€\U0001f600\u2028"\\' * 70_000)[:400_000]

    @fk.workflow("staged")
    async def staged(ctx: Context) -> int:
        value = await ctx.step("make 'it'", lambda: {"t": text, "n": [1e16, -0.0]})
        return len(value["t"])

    handle = await fk.trigger("staged")
    await finish(fk, handle.run_id)
    info = await fk.get_run(handle.run_id)
    assert info.output == len(text)
    assert info.steps[0].output == {"t": text, "n": [1e16, -0.0]}
    async with fk.db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM flowkeeper.step_chunks") == 0


async def test_lost_chunks_never_record_a_partial_value(
    fk: FlowKeeper, small_stages: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    text = "x" * 500_000
    real_stage = store_module.Store._stage

    async def stage_then_lose_one(self: Any, run_id: Any, token: Any, key: str, t: str) -> int:
        count = await real_stage(self, run_id, token, key, t)
        if calls["n"] == 0:  # as a server crash would: the unlogged table loses rows
            async with fk.db.acquire() as conn:
                await conn.execute("DELETE FROM flowkeeper.step_chunks WHERE seq = 2")
        calls["n"] += 1
        return count

    monkeypatch.setattr(store_module.Store, "_stage", stage_then_lose_one)
    bodies = {"n": 0}

    @fk.workflow("lossy")
    async def lossy(ctx: Context) -> int:
        def make() -> str:
            bodies["n"] += 1
            return text

        return len(await ctx.step("make", make))

    handle = await fk.trigger("lossy")
    with pytest.raises(DatabaseError, match="staged chunks"):
        await fk.advance(handle.run_id)
    async with fk.db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM flowkeeper.steps") == 0
        # The lease is given up as by a dead invocation: let it expire now.
        await conn.execute("UPDATE flowkeeper.runs SET due_at = now() - interval '1 s'")
    await finish(fk, handle.run_id)
    info = await fk.get_run(handle.run_id)
    assert info.output == len(text)
    assert info.steps[0].output == text
    assert bodies["n"] == 2  # the step ran again: its record had never been written


async def test_a_stale_lease_records_nothing_and_leaves_no_chunks(
    fk: FlowKeeper, small_stages: None
) -> None:
    store = fk.store
    await store.ensure_schema()
    run_id, token = str(uuid.uuid4()), uuid.uuid4()
    await store.create_claimed(
        run_id=run_id,
        workflow="w",
        input_json="null",
        idempotency_key=None,
        lease_token=token,
        lease=timedelta(seconds=30),
    )
    big = StepRecord(
        key="s",
        position=0,
        name="s",
        kind="step",
        status="completed",
        input=None,
        output='"' + "y" * 400_000 + '"',
        output_type=None,
        error=None,
        attempts=1,
        started_at=datetime.now(UTC),
        finished_at=datetime.now(UTC),
    )
    assert await store.commit(run_id, uuid.uuid4(), status="running", steps=[big]) is False
    assert await store.commit(run_id, token, status="completed", steps=[big]) is not False
    async with fk.db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM flowkeeper.step_chunks") == 0
        stored = await conn.fetchval("SELECT output::text FROM flowkeeper.steps")
    assert stored == big.output


async def _no_temporary_files(fk: FlowKeeper) -> None:
    """The test database allows no temporary files and 1 MB of work_mem."""
    async with fk.db.acquire() as conn:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'ALTER DATABASE "{name}" SET temp_file_limit = 0')
        await conn.execute(f"ALTER DATABASE \"{name}\" SET work_mem = '1MB'")
    await fk.db.close()  # new connections take the settings


async def test_step_values_go_into_their_rows_without_temporary_files(
    database_url: str, fk: FlowKeeper
) -> None:
    """A step value goes from the statement's parameters into its row without
    being collected on the way: Postgres collects a function's rows in memory up
    to work_mem, then in a temporary file (a copy written and read back, per
    value).  On a database that allows no temporary files at all and 1 MB of
    work_mem, a 2 MB result is stored exact through commit_lean and through
    commit, and eight 300 KB results of eight runs as one statement
    (commit_lean_many)."""
    from .test_commit_many import _args, _fresh

    await _no_temporary_files(fk)
    text = "".join(chr(0x41 + (i * 7919) % 26) for i in range(2_000_000))

    @fk.workflow("large")
    async def large(ctx: Context) -> int:
        return len(await ctx.step("make", lambda: text))

    for lean in (True, False):  # commit_lean, then commit
        fk.store.lean_commit = lean
        handle = await fk.trigger("large")
        await finish(fk, handle.run_id)
        async with fk.db.acquire() as conn:
            stored = await conn.fetchval(
                "SELECT output::text FROM flowkeeper.steps WHERE run_id = $1",
                uuid.UUID(handle.run_id),
            )
        assert stored == dumps(text, what="x"), f"lean={lean}"

    ids, tokens = await _fresh(fk, 8)
    values = [dumps(text[n : n + 300_000], what="x") for n in range(8)]
    writes = [
        (
            "commit_lean",
            _args(
                fk.store,
                run_id,
                token,
                {"ending": "completed", "output": "1", "steps": [("v", value, "step", False)]},
                0,
            ),
        )
        for run_id, token, value in zip(ids, tokens, values, strict=True)
    ]
    rows = await fk.store._call_many(writes)
    assert all(row is not None for row in rows)
    async with fk.db.acquire() as conn:
        stored_many = await conn.fetch(
            "SELECT run_id, output::text AS output FROM flowkeeper.steps WHERE run_id = ANY ($1)",
            [uuid.UUID(i) for i in ids],
        )
    assert {str(r["run_id"]): r["output"] for r in stored_many} == dict(
        zip(ids, values, strict=True)
    )


async def test_a_run_with_a_history_larger_than_work_mem_resumes_without_temporary_files(
    database_url: str, fk: FlowKeeper
) -> None:
    """A claim updates the run, so Postgres keeps the claim's whole answer before
    sending it, past work_mem in a temporary file.  A history larger than a
    few KB is read in a statement of its own, sent as it is made: on a
    database that allows no temporary files, a run of four 2 MB results and
    sleeps between them resumes after each sleep, and resumes again after a
    replay from its third step."""
    await _no_temporary_files(fk)
    text = "".join(chr(0x41 + (i * 7919) % 26) for i in range(2_000_000))
    calls: list[int] = []

    def make(i: int) -> str:
        calls.append(i)
        return f"{i}{text}"

    @fk.workflow("long")
    async def long(ctx: Context) -> list[str]:
        heads = []
        for i in range(4):
            heads.append((await ctx.step(f"make{i}", make, i))[:3])
            await ctx.sleep(f"nap{i}", timedelta(milliseconds=5))
        return heads

    handle = await fk.trigger("long")
    segments = await finish(fk, handle.run_id)
    assert len(segments) == 5  # four sleeps: five invocations, each after the first a resume
    heads = [f"{i}{text[:2]}" for i in range(4)]
    assert await fk.result(handle.run_id) == heads
    assert calls == [0, 1, 2, 3]
    await fk.replay(handle.run_id, from_step="make2")
    await finish(fk, handle.run_id)
    assert await fk.result(handle.run_id) == heads
    assert calls == [0, 1, 2, 3, 2, 3]


async def test_large_run_inputs_are_created_and_resumed_without_temporary_files(
    database_url: str, fk: FlowKeeper
) -> None:
    """A run's input goes into its row without being collected or sent back: a
    statement that writes keeps its whole answer before sending it (past
    work_mem in a temporary file), as does PL/pgSQL's RETURN QUERY.  On a
    database that allows no temporary files, runs whose inputs are 2 MB and
    300 KB, plain and flow-controlled, are created by the endpoint through
    trigger(), resumed after a sleep and finish with exact inputs; eight
    300 KB creates as one statement, plain and gated, store every input exact."""
    from flowkeeper import Concurrency

    from ..helpers import drive, make_fk, serve
    from .test_commit_many import LEASE, _gated_args

    await _no_temporary_files(fk)
    big = "".join(chr(0x41 + (i * 7919) % 26) for i in range(2_000_000))
    app = make_fk(database_url, pool_size=2)

    async def body(ctx: Context, inp: dict[str, Any]) -> str:
        n = await ctx.step("len", lambda: len(inp["t"]))
        await ctx.sleep("nap", timedelta(milliseconds=5))  # a resume reads the input again
        return inp["t"][:3] + str(n)

    app.workflow("plain")(body)
    app.workflow("gated", concurrency=Concurrency(limit=50, key=lambda inp: inp["k"]))(body)
    inputs = [{"k": "a", "t": big}] + [{"k": "b", "t": big[n : n + 300_000]} for n in range(8)]
    try:
        async with serve(app):
            handles = [await app.trigger(w, inp) for w in ("plain", "gated") for inp in inputs]
            statuses = await drive(app, [h.run_id for h in handles], timeout=60)
        assert set(statuses.values()) == {"completed"}, statuses
        for handle, inp in zip(handles, inputs * 2, strict=True):
            assert await app.result(handle.run_id) == inp["t"][:3] + str(len(inp["t"]))
    finally:
        await app.aclose()

    # The batched creates (group commit's create_claimed_many and
    # create_gated_batch_lean), written directly.
    store = fk.store
    texts = [dumps({"t": big[n : n + 300_000]}, what="x") for n in range(8)]
    plain = [
        (
            "create_claimed_run",
            (uuid.uuid4(), "plain", store.sealer.seal_json(t), None, uuid.uuid4(), LEASE, None),
        )
        for t in texts
    ]
    gated = [
        ("create_gated_run", _gated_args(store, {"id": n, "input": t, "key": None, "flow": ["k"],
                                                 "limit": 50, "priority": 0, "rate": []}))
        for n, t in enumerate(texts)
    ]  # fmt: skip
    for writes in (plain, gated):
        rows = await store._call_many(writes)
        assert all(row is not None for row in rows)
        ids = [w[1][0] for w in writes]
        async with fk.db.acquire() as conn:
            stored = await conn.fetch(
                "SELECT id, input::text AS input FROM flowkeeper.runs WHERE id = ANY ($1)", ids
            )
        assert {r["id"]: r["input"] for r in stored} == dict(zip(ids, texts, strict=True))
