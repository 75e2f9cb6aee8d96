from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from flowkeeper import FlowKeeper

from ..helpers import make_fk


@pytest.fixture
async def fk(database_url: str) -> AsyncIterator[FlowKeeper]:
    """A FlowKeeper on a fresh database, endpoint on a free port (not yet served)."""
    instance = make_fk(database_url)
    try:
        yield instance
    finally:
        await instance.aclose()
