"""commit_lean is commit without events and staged outputs, and nothing else differs."""

from __future__ import annotations

import re

from flowkeeper.sql import load_queries


def _code(sql: str) -> str:
    """The statement without comments, its whitespace collapsed."""
    return " ".join(re.sub(r"--[^\n]*", "", sql).split())


def _part(sql: str, start: str, end: str) -> str:
    code = _code(sql)
    return code[code.index(start) : code.index(end)]


def test_the_lean_commit_fences_and_writes_steps_as_commit_does() -> None:
    q = load_queries("flowkeeper")
    full, lean = q["commit"], q["commit_lean"]
    # The run's update (fencing, due time): commit's $28 is commit_lean's $24.
    assert _part(full, "WITH r AS (", "), s AS (").replace("$28", "$24") == _part(
        lean, "WITH r AS (", "), s AS ("
    )
    # The steps' conflict rule.
    assert _part(full, "ON CONFLICT", "), e AS (") == _part(lean, "ON CONFLICT", ") SELECT id")
    # Same columns written, same values, save the staged output put together.
    cols = _part(full, "INSERT INTO flowkeeper.steps", "FROM r")
    assert cols.replace("o.output", "x.output") == _part(
        lean, "INSERT INTO flowkeeper.steps", "FROM r"
    )
    assert "events" not in _code(lean) and "staged" not in _code(lean)
    assert max(int(n) for n in re.findall(r"\$(\d+)", lean)) == 24
