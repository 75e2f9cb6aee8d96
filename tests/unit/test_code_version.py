"""A workflow's code version: explicit, or a hash of its source the user opts into."""

from __future__ import annotations

import pytest

from flowkeeper import Context, WorkflowError, define_workflow, source_hash


async def checkout(ctx: Context) -> None:
    return None


async def checkout_changed(ctx: Context) -> int:
    return 1


def test_explicit_and_source_hash_versions() -> None:
    assert define_workflow("c", checkout, version="2026-12-01").version == "2026-12-01"
    assert define_workflow("c", checkout).version is None
    hashed = define_workflow("c", checkout, version=source_hash).version
    assert hashed is not None and hashed.startswith("src-") and len(hashed) == 16
    assert hashed == source_hash(checkout)
    assert source_hash(checkout_changed) != hashed


@pytest.mark.parametrize("bad", ["", "has space", "x" * 101, "é", "nul\x00", 3])
def test_bad_versions_are_refused_at_definition(bad: object) -> None:
    with pytest.raises(WorkflowError, match="version must be"):
        define_workflow("c", checkout, version=bad)  # type: ignore[arg-type]


def test_source_hash_needs_source() -> None:
    with pytest.raises(WorkflowError, match="set version="):
        define_workflow("c", eval("lambda ctx: ctx"), version=source_hash)
