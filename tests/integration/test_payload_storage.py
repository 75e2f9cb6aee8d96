"""Large payloads are stored compressed with lz4 (where the server has it), and read back exact."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from flowkeeper import Context, FlowKeeper
from flowkeeper.serialization import dumps

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
