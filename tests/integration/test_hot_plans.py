"""Group commit's batch of step writes keeps finding its runs by primary key as runs grows.

A driver's connection prepares commit_lean_many once and, after five runs,
Postgres may keep a generic plan made with the statistics of that moment.  In
a new database those say runs holds a few rows; the plan joined the batch to a
scan of every run, and was kept while runs grew, until autovacuum next
analyzed it (a minute or more away, and never in a burst shorter than that):
0.63 ms of Postgres time per workflow after 12,000 runs, 0.12 ms with index
scans (migration 0022).  This test sends batches on one connection while
runs is tiny, grows it by thousands of finished runs, sends more, and counts
the sequential scans of runs each batch made: none.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from flowkeeper.sql import load_queries

QUERIES = load_queries("flowkeeper")
GROWN = 20_000
SCANS = (
    "SELECT coalesce(sum(seq_scan), 0) FROM pg_stat_xact_user_tables "
    "WHERE schemaname = 'flowkeeper' AND relname = 'runs'"
)
T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


async def _runs(conn: asyncpg.Connection, count: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """``count`` live runs leased: (id, lease token) each."""
    runs = [(uuid.uuid4(), uuid.uuid4()) for _ in range(count)]
    await conn.execute(
        "INSERT INTO flowkeeper.runs (id, workflow, status, input, lease_token, due_at, "
        "executing) SELECT i, 'three', 'running', '1', t, now() + interval '1 minute', true "
        "FROM unnest($1::uuid[], $2::uuid[]) AS x(i, t)",
        [r[0] for r in runs],
        [r[1] for r in runs],
    )
    return runs


def _batch(runs: list[tuple[uuid.UUID, uuid.UUID]], key: str) -> tuple[Any, ...]:
    """commit_lean_many's arguments: each run records step ``key`` and stays running."""
    n = len(runs)
    return (
        [r[0] for r in runs], [r[1] for r in runs], ["running"] * n, [r[1] for r in runs],
        [None] * n, [None] * n, [None] * n, [None] * n, [key] * n, [0] * n, [True] * n,
        list(range(1, n + 1)), [key] * n, [0] * n, [key] * n, ["step"] * n,
        ["completed"] * n, [None] * n, ['{"k": "\\u2028"}'] * n, [None] * n, [None] * n,
        [1] * n, [T0] * n, [T0] * n, [None] * n, None, None, None,
    )  # fmt: skip


async def _scans(conn: asyncpg.Connection, runs: list[Any], key: str) -> int:
    async with conn.transaction():
        before = await conn.fetchval(SCANS)
        rows = await conn.fetch(QUERIES["commit_lean_many"], *_batch(runs, key))
        assert sorted(r["ord"] for r in rows) == list(range(1, len(runs) + 1))
        return int(await conn.fetchval(SCANS) - before)


@pytest.mark.parametrize("analyzed", [False, True], ids=["never analyzed", "analyzed tiny"])
async def test_a_batch_reads_runs_by_primary_key_while_tiny_and_after_growing(
    conn: asyncpg.Connection, analyzed: bool
) -> None:
    runs = await _runs(conn, 24)
    if analyzed:
        await conn.execute("VACUUM ANALYZE flowkeeper.runs")
    # Past five calls the prepared statement may keep a generic plan: made now.
    for n in range(8):
        assert await _scans(conn, runs[n % 3 * 8 : n % 3 * 8 + 8], f"s'{n}") == 0, n
    await conn.execute(
        "INSERT INTO flowkeeper.runs (id, workflow, status, input, finished_at) "
        "SELECT gen_random_uuid(), 'old', 'completed', '1', now() FROM generate_series(1, $1)",
        GROWN,
    )
    for n in range(8, 11):
        assert await _scans(conn, runs[n % 3 * 8 : n % 3 * 8 + 8], f"é:{n}") == 0, n


async def test_the_batch_function_keeps_its_index_setting(conn: asyncpg.Connection) -> None:
    # CREATE OR REPLACE FUNCTION drops the SET clause: a migration that replaces
    # commit_lean_many must set it again.
    config = await conn.fetchval(
        "SELECT p.proconfig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'flowkeeper' AND p.proname = 'commit_lean_many'"
    )
    assert "enable_seqscan=off" in (config or [])
