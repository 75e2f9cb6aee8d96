"""Short run ids, as the dashboard shows them, name runs in ``flowkeeper runs ...``."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from flowkeeper import FlowKeeper
from flowkeeper.cli import main
from flowkeeper.errors import RunNotFoundError
from flowkeeper.shortids import AmbiguousRunIdError, resolve_run_id

from ..helpers import KEY

A = "0193f1c2-7a4b-7c00-8000-00000000a9e1"
B = "0193f1c2-7a4b-7c00-8000-00000000b9e2"
C = "0193f1c3-0000-7c00-8000-000000000001"


@pytest.fixture
async def fk(database_url: str) -> FlowKeeper:
    conn = await asyncpg.connect(database_url)
    for rid in (A, B, C):
        await conn.execute(
            "INSERT INTO flowkeeper.runs (id, workflow, status, input) "
            "VALUES ($1, 'w', 'completed', 'null')",
            uuid.UUID(rid),
        )
    await conn.close()
    fk = FlowKeeper(database_url, signing_key=KEY)
    yield fk
    await fk.aclose()


CASES: list[tuple[str, str | None]] = [
    (A, A),
    (A.upper(), A),
    ("0193f1c3", C),
    ("0193f1c27a4b7c008000", None),  # ambiguous
    ("0193f1c2…a9e1", A),
    ("0193f1c2...b9e2", B),
    ("0193f1c2-7a4b…9e2", B),
    ("0193f1c3…0001", C),
]
BAD = ["0193", "zzzzzzzz", "0193f1c4", "0193f1c2…ffff", "", "%", "0193f1c_", "0193f1c2…%"]


async def test_resolve(fk: FlowKeeper) -> None:
    for short, full in CASES:
        if full is None:
            with pytest.raises(AmbiguousRunIdError, match="more than one run") as err:
                await resolve_run_id(fk.store, short)
            assert set(err.value.matches) == {A, B}
        else:
            assert await resolve_run_id(fk.store, short) == full, short
    for bad in BAD:
        with pytest.raises(RunNotFoundError):
            await resolve_run_id(fk.store, bad)


async def test_runs_show_takes_the_short_id(
    fk: FlowKeeper, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await asyncio.to_thread(
        main, ["runs", "show", "0193f1c2…a9e1", "--database-url", database_url]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert A in out
    code = await asyncio.to_thread(
        main, ["runs", "show", "0193f1c2", "--database-url", database_url]
    )
    out, err = capsys.readouterr()
    assert code == 1 and "more than one run" in err and "…" in err
