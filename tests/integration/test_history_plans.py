"""The hot path's lookups stay primary-key lookups over a large history of finished runs.

A database that has run for months holds mostly finished runs, and its
statistics say so: almost no run is live, almost none has a due time.  With
such statistics the planner once preferred to scan every live run (through
``runs_status_idx`` or ``runs_due_idx``) over looking one run up by its
primary key; the cost of a claim and of a group-commit batch then grew with
the number of live runs and of the index entries their updates left behind
(``bench.growth --only history``: 0.79 of the empty-schema throughput).
These tests plan the queries over such a history, as custom and as generic
plans, and look at how each finds its rows of ``runs``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest

from flowkeeper.ids import new_run_id
from flowkeeper.sql import load_queries

QUERIES = load_queries("flowkeeper")
HISTORY = 100_000
LIVE = 64

# v7 ids spread over the last 30 days, as flowkeeper's own ids would be.
FILL = """
INSERT INTO flowkeeper.runs (id, workflow, status, input, output, created_at, started_at,
                             finished_at, invocations)
SELECT encode(set_byte(overlay(uuid_send(gen_random_uuid()) PLACING substring(int8send(
           (extract(epoch FROM t) * 1000)::bigint) FROM 3) FROM 1 FOR 6), 6, 112), 'hex')::uuid,
       'three', 'completed', to_json(g), to_json(g), t, t, t, 1
FROM generate_series(1, $1) AS g,
     LATERAL (SELECT now() - interval '30 days' + g * interval '20 seconds') AS x(t)
"""


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    return "'" + str(value).replace("'", "''") + "'"


def _array(values: list[Any], type_: str) -> str:
    return f"ARRAY[{', '.join(_literal(v) for v in values)}]::{type_}[]"


def _runs_access(plan: list[dict[str, Any]]) -> set[str]:
    """How the plan reads table runs: index names, or 'Seq Scan'."""
    found: set[str] = set()

    def walk(node: dict[str, Any]) -> None:
        if node.get("Relation Name") == "runs" and node["Node Type"] != "ModifyTable":
            found.add(node.get("Index Name") or node["Node Type"])
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return found


@pytest.fixture
async def history(conn: asyncpg.Connection) -> list[uuid.UUID]:
    await conn.execute(FILL, HISTORY)
    await conn.execute("VACUUM ANALYZE flowkeeper.runs")
    live = [uuid.UUID(new_run_id()) for _ in range(LIVE)]
    await conn.execute(
        "INSERT INTO flowkeeper.runs (id, workflow, status, input, lease_token, due_at, "
        "executing) SELECT i, 'three', 'running', '1', i, now() + interval '1 minute', true "
        "FROM unnest($1::uuid[]) AS i",
        live,
    )
    return live


async def _function_body(conn: asyncpg.Connection, name: str) -> str:
    """The statement an installed PL/pgSQL function runs (its RETURN QUERY)."""
    source: str = await conn.fetchval(
        "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'flowkeeper' AND p.proname = $1",
        name,
    )
    return source.split("RETURN QUERY", 1)[1].rsplit(";", 1)[0]


async def _explain(conn: asyncpg.Connection, query: str, args: list[str], mode: str) -> Any:
    await conn.execute(f"SET plan_cache_mode = {mode}")
    name = f"q_{uuid.uuid4().hex}"
    await conn.execute(f"PREPARE {name} AS {query}")
    text = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE {name}({', '.join(args)})")
    return json.loads(text)


MODES = ("force_custom_plan", "force_generic_plan")


async def test_a_claim_finds_its_run_by_primary_key(
    conn: asyncpg.Connection, history: list[uuid.UUID]
) -> None:
    run = history[0]
    args = [
        f"'{run}'::uuid",
        f"'{run}'::uuid",
        f"'{uuid.uuid4()}'::uuid",
        "'1 minute'",
        "'30 seconds'",
        "16384",
        "16",
    ]
    for mode in MODES:
        plan = await _explain(conn, QUERIES["claim_run"], args, mode)
        assert _runs_access(plan) == {"runs_pkey"}, mode


async def test_a_group_commit_batch_finds_its_runs_by_primary_key(
    conn: asyncpg.Connection, history: list[uuid.UUID]
) -> None:
    runs = history[:32]
    n = len(runs)
    args = [
        _array(runs, "uuid"), _array(runs, "uuid"), _array(["running"] * n, "text"),
        _array(runs, "uuid"), _array([None] * n, "interval"), _array([None] * n, "timestamptz"),
        _array([None] * n, "json"), _array([None] * n, "jsonb"), _array(["s"] * n, "text"),
        _array([0] * n, "integer"), _array([True] * n, "boolean"),
        _array(list(range(1, n + 1)), "bigint"), _array(["s"] * n, "text"),
        _array([0] * n, "integer"), _array(["s"] * n, "text"), _array(["step"] * n, "text"),
        _array(["completed"] * n, "text"), _array([None] * n, "json"),
        _array(["1"] * n, "json"), _array([None] * n, "text"), _array([None] * n, "jsonb"),
        _array([1] * n, "integer"), _array(["2026-01-01T00:00:00Z"] * n, "timestamptz"),
        _array(["2026-01-01T00:00:00Z"] * n, "timestamptz"), _array([None] * n, "timestamptz"),
        "NULL", "NULL", "NULL",  # no prelock
    ]  # fmt: skip
    # The statement is the body of the function commit_lean_many (migration 0022).
    body = await _function_body(conn, "commit_lean_many")
    for mode in MODES:
        plan = await _explain(conn, body, args, mode)
        assert _runs_access(plan) == {"runs_pkey"}, mode
