"""The flow-control functions read runs, slots and rate_limits through their indexes.

PL/pgSQL caches each query's plan per session.  A plan made while a table
held a few pages (a new database, or right after a VACUUM ANALYZE of a nearly
empty one) scans the whole table, and that plan was kept while the table grew:
flow_prelock read every run once per group commit batch (migration 0021).
These tests drive every flow-control function on one session, first while the
tables are tiny and then after runs grew by thousands of rows, and count the
sequential scans each call made (``pg_stat_xact_user_tables``): none.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from flowkeeper.sql import load_queries

QUERIES = load_queries("flowkeeper")
FUNCTIONS = (
    "flow_gate", "flow_held", "flow_wake", "flow_release", "flow_throttle", "flow_sweep",
    "flow_prelock", "create_gated", "create_gated_batch", "flow_gate_within",
    "create_gated_lean", "create_gated_batch_lean",
)  # fmt: skip
SCANS = (
    "SELECT coalesce(sum(seq_scan), 0) FROM pg_stat_xact_user_tables "
    "WHERE schemaname = 'flowkeeper' AND relname IN ('runs', 'slots', 'rate_limits')"
)
LEASE = timedelta(minutes=5)
GROWN = 20_000
STEPS = ("set path", "run by run", "release", "gate", "sweep", "prelock")


def _batch(runs: list[dict[str, Any]], prelock: bool) -> tuple[Any, ...]:
    """create_gated_many's arguments for these runs (see Store._create_gated_many)."""
    flat = {c: [x for r in runs for x in (r.get(c) or ())] for c in ("keys", "limits", "rates")}
    ids = [r["id"] for r in runs]
    return (
        ids, ["w"] * len(runs), ["1"] * len(runs), [None] * len(runs),
        [r["token"] for r in runs], [LEASE] * len(runs), [0] * len(runs),
        [None] * len(runs), [None] * len(runs), [None] * len(runs),
        [len(r["keys"]) if r.get("keys") else None for r in runs],
        [len(r["limits"]) if r.get("limits") else None for r in runs],
        [len(r["rates"]) if r.get("rates") else None for r in runs],
        [len(r["rates"]) if r.get("rates") else None for r in runs],
        flat["keys"], flat["limits"], flat["rates"],
        [timedelta(milliseconds=1)] * len(flat["rates"]),
        ids if prelock else None, flat["keys"] if prelock else None,
        flat["rates"] if prelock else None,
    )  # fmt: skip


def _run(keys: list[str] | None = None, limits: list[int] | None = None,
         rates: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    return {"id": uuid.uuid4(), "token": uuid.uuid4(), "keys": keys, "limits": limits,
            "rates": rates}  # fmt: skip


async def _scans(conn: asyncpg.Connection, query: str, *args: Any) -> tuple[int, list[Any]]:
    """Sequential scans of the flow tables made by one statement, and its rows."""
    async with conn.transaction():
        before = await conn.fetchval(SCANS)
        rows = await conn.fetch(query, *args)
        return await conn.fetchval(SCANS) - before, rows


async def _round(conn: asyncpg.Connection, n: int) -> dict[str, int]:
    """Every flow-control function once or more; the sequential scans of each step."""
    seen: dict[str, int] = {}
    # Keys as users' key functions make them: quotes, non-ASCII, separators.
    full = f"w:full'{n}"
    # The set path (flow_prelock, flow_lock, the room check): room for all.
    roomy = [_run([f"w:ä\\{n}"], [5]), _run([f"w:b:{n};", "w:g"], [5, 10_000]), _run([full], [1])]
    seen["set path"], rows = await _scans(conn, QUERIES["create_gated_many"], *_batch(roomy, True))
    assert [r["outcome"] for r in rows] == ["claimed"] * 3
    # Run by run (create_gated, flow_held, flow_gate parking, flow_wake, flow_throttle):
    # the key that holds one is full, and a run with a rate key.
    parked, throttled = _run([full], [1]), _run(rates=[f'w:r"{n}'])
    seen["run by run"], rows = await _scans(
        conn, QUERIES["create_gated_many"], *_batch([parked, throttled], True)
    )
    assert [r["outcome"] for r in rows] == ["gated", "claimed"]
    # The holder ends (runs_flow_release, flow_wake): the parked run is made due.
    # Through a cursor, so that the statement's own scan is a TID scan.
    async with conn.transaction():
        await conn.execute(
            "DECLARE holder CURSOR FOR SELECT 1 FROM flowkeeper.runs "
            f"WHERE id = '{roomy[2]['id']}' FOR UPDATE"
        )
        await conn.execute("FETCH holder")
        before = await conn.fetchval(SCANS)
        await conn.execute(
            "UPDATE flowkeeper.runs SET status = 'completed', executing = false, "
            "lease_token = NULL, due_at = NULL, finished_at = now() WHERE CURRENT OF holder"
        )
        seen["release"] = await conn.fetchval(SCANS) - before
    due = await conn.fetchval(
        "SELECT due_at IS NOT NULL AND blocked_key IS NULL FROM flowkeeper.runs WHERE id = $1",
        parked["id"],
    )
    assert due, "the release woke the parked run"
    # A claim's gate of the woken run takes the freed slot.
    seen["gate"], rows = await _scans(conn, "SELECT flowkeeper.flow_gate($1, NULL)", parked["id"])
    assert rows[0][0] is True
    # The ticks' safety net, and a batch ending two runs (prelock of their rows and keys).
    seen["sweep"], _ = await _scans(conn, "SELECT flowkeeper.flow_sweep(10)")
    seen["prelock"], _ = await _scans(
        conn, "SELECT flowkeeper.flow_prelock($1, $2, $3)",
        [roomy[0]["id"], roomy[1]["id"]], [], [f"w:r\"{n}"],
    )  # fmt: skip
    return seen


@pytest.mark.parametrize("analyzed", [False, True], ids=["never analyzed", "analyzed tiny"])
async def test_flow_control_reads_by_index_while_tiny_and_after_growing(
    conn: asyncpg.Connection, analyzed: bool
) -> None:
    if analyzed:
        await conn.execute("VACUUM ANALYZE flowkeeper.runs, flowkeeper.slots")
    # Past five calls PL/pgSQL may keep a generic plan: made now, with tiny tables.
    for n in range(8):
        assert await _round(conn, n) == dict.fromkeys(STEPS, 0), n
    await conn.execute(
        "INSERT INTO flowkeeper.runs (id, workflow, status, input, finished_at) "
        "SELECT gen_random_uuid(), 'old', 'completed', '1', now() FROM generate_series(1, $1)",
        GROWN,
    )
    for n in range(8, 11):
        assert await _round(conn, n) == dict.fromkeys(STEPS, 0), n


async def test_each_flow_control_function_keeps_its_index_setting(
    conn: asyncpg.Connection,
) -> None:
    # CREATE OR REPLACE FUNCTION drops a function's SET clause: a migration that
    # replaces one of these must set it again.
    rows = await conn.fetch(
        "SELECT p.proname, p.proconfig FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'flowkeeper' AND p.proname = ANY($1::text[])",
        list(FUNCTIONS),
    )
    assert {r["proname"] for r in rows} == set(FUNCTIONS)
    missing = [r["proname"] for r in rows if "enable_seqscan=off" not in (r["proconfig"] or [])]
    assert missing == []
