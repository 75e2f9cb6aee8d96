"""Rolling schema upgrades: an older library on a newer schema, compatible or not.

The schema records, per applied migration, the lowest schema version a
library must know to use it (additive migrations: any).  0.1's own code,
taken from git history, runs a workflow end to end on today's schema once
its version check is satisfied (what the compatibility record does for
libraries from now on), and refuses the schema unmodified, naming both
versions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from flowkeeper import Context, MigrationError
from flowkeeper.migrations import latest_version
from flowkeeper.sql import migrations

from ..helpers import KEY, make_fk, serve

ROOT = Path(__file__).resolve().parents[2]
#: The last commit of 0.1 on main (before events and waits; schema version 5).
V01 = "34aa74c"
V01_SCHEMA = 5


async def _future_migration(conn: asyncpg.Connection, requires: int | None) -> int:
    """What a newer deploy's migration leaves behind: a new column, and its record."""
    future = latest_version() + 1
    await conn.execute("ALTER TABLE flowkeeper.runs ADD COLUMN future_column integer")
    await conn.execute(
        "INSERT INTO flowkeeper.migrations (version, name, requires_library) "
        "VALUES ($1, 'priorities', $2)",
        future,
        requires,
    )
    return future


async def test_a_compatible_newer_schema_is_used(
    database_url: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await _future_migration(conn, 1)
    fk = make_fk(database_url)

    @fk.workflow("w")
    async def w(ctx: Context) -> str:
        return await ctx.step("s", lambda: "ok")

    caplog.set_level("INFO", logger="flowkeeper")
    try:
        async with serve(fk):
            run_id = (await fk.trigger("w")).run_id
            assert await fk.result(run_id, timeout=10) == "ok"
    finally:
        await fk.aclose()
    assert "compatible" in caplog.text


async def test_an_incompatible_newer_schema_is_refused_naming_both_versions(
    database_url: str, conn: asyncpg.Connection
) -> None:
    future = await _future_migration(conn, latest_version() + 1)
    fk = make_fk(database_url)
    try:
        with pytest.raises(MigrationError) as info:
            await fk.get_run(str(uuid.uuid4()))
    finally:
        await fk.aclose()
    message = str(info.value)
    assert f"at version {future}" in message
    assert f"knows up to version {latest_version()}" in message
    assert "Upgrade flowkeeper" in message


async def test_each_migration_records_what_it_requires(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch("SELECT version, requires_library FROM flowkeeper.migrations")
    assert {r["version"]: r["requires_library"] for r in rows} == {
        m.version: m.requires_library for m in migrations()
    }


def test_migrations_since_0_1_are_additive() -> None:
    """Nothing dropped, renamed or narrowed unless the migration says older code must stop."""
    breaking = re.compile(
        r"DROP\s+(TABLE|COLUMN|FUNCTION|INDEX)|RENAME|ALTER\s+COLUMN\s+\w+\s+(TYPE|SET\s+NOT\s+NULL)",
        re.I,
    )
    for m in migrations():
        if m.version <= V01_SCHEMA:
            continue
        code = "\n".join(line for line in m.template.splitlines() if not line.startswith("--"))
        # Re-creating a function or a constraint in place (CREATE OR REPLACE, DROP then
        # ADD CONSTRAINT of a wider check) keeps older queries working.
        code = re.sub(r"DROP\s+CONSTRAINT", "", code, flags=re.I)
        hits = breaking.findall(code)
        assert not hits or m.requires_library == m.version, (m.version, m.name, hits)


_V01_SCRIPT = """
import asyncio, json, sys
import flowkeeper
from flowkeeper import FlowKeeper, Context, MigrationError

url, key, newest, patch = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "patch"
assert flowkeeper.__file__.startswith(sys.argv[5]), flowkeeper.__file__

async def main():
    if patch:  # what the compatibility record gives libraries from now on
        import flowkeeper.migrations as m
        m.latest_version = lambda: newest
    fk = FlowKeeper(database_url=url, signing_key=key)

    @fk.workflow("legacy")
    async def legacy(ctx: Context, n: int) -> int:
        n = await ctx.step("double", lambda v: v * 2, n)
        await ctx.sleep("nap", 0.05)
        return await ctx.step("inc", lambda v: v + 1, n)

    try:
        handle = await fk.trigger("legacy", 20)
    except MigrationError as exc:
        print(json.dumps({"refused": str(exc)}))
        return
    for _ in range(50):
        await fk.advance(handle.run_id)
        info = await fk.get_run(handle.run_id)
        if info.status.value == "completed":
            break
        await asyncio.sleep(0.06)
    print(json.dumps({"run_id": handle.run_id, "status": info.status.value, "output": info.output}))
    await fk.aclose()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def v01_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("flowkeeper-0.1")
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", V01, "flowkeeper"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"0.1's code is not in this checkout's git history: {exc}")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def _run_v01(code: Path, database_url: str, patch: bool) -> dict[str, object]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _V01_SCRIPT,
            database_url,
            KEY,
            str(latest_version()),
            "patch" if patch else "plain",
            str(code),
        ],
        capture_output=True,
        text=True,
        cwd=code,
        env={**os.environ, "PYTHONPATH": str(code)},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def test_0_1_code_runs_on_todays_schema(database_url: str, v01_code: Path) -> None:
    result = _run_v01(v01_code, database_url, patch=True)
    assert result["status"] == "completed" and result["output"] == 41
    # Today's library reads what 0.1 wrote.
    fk = make_fk(database_url)
    try:
        info = await fk.get_run(str(result["run_id"]))
        assert [s.key for s in info.steps] == ["double", "nap", "inc"]
        assert info.code_version is None
    finally:
        await fk.aclose()


async def test_0_1_code_unmodified_refuses_naming_both_versions(
    database_url: str, v01_code: Path
) -> None:
    result = _run_v01(v01_code, database_url, patch=False)
    refused = str(result["refused"])
    assert f"version {latest_version()}" in refused and f"({V01_SCHEMA})" in refused
