"""A database clock that tests can move forward.

Every due time flowkeeper compares goes through ``<schema>.clock_now()``.
``FakeClock`` replaces that function's body with ``now()`` plus an offset held
in a one-row table, so a test can jump over a one-day sleep in an instant.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ..sql import validate_schema

if TYPE_CHECKING:
    import asyncpg


class FakeClock:
    """Shift the flowkeeper clock of one schema (``await clock.advance(...)``)."""

    def __init__(self, conn: asyncpg.Connection, schema: str = "flowkeeper") -> None:
        self.conn = conn
        self.schema = validate_schema(schema)

    async def install(self) -> FakeClock:
        s = self.schema
        await self.conn.execute(
            f"""
            CREATE TABLE IF NOT EXISTS {s}.fake_clock (shift interval NOT NULL);
            INSERT INTO {s}.fake_clock
                SELECT interval '0' WHERE NOT EXISTS (SELECT 1 FROM {s}.fake_clock);
            CREATE OR REPLACE FUNCTION {s}.clock_now() RETURNS timestamptz
                LANGUAGE sql STABLE PARALLEL SAFE
                AS $$ SELECT now() + (SELECT shift FROM {s}.fake_clock LIMIT 1) $$;
            """
        )
        return self

    async def advance(self, by: timedelta | float) -> None:
        """Move the clock forward (or back, with a negative value)."""
        delta = by if isinstance(by, timedelta) else timedelta(seconds=by)
        await self.conn.execute(f"UPDATE {self.schema}.fake_clock SET shift = shift + $1", delta)

    async def travel_to(self, at: datetime) -> None:
        """Set the clock to ``at`` (an aware datetime); it runs on from there."""
        if at.tzinfo is None:
            raise ValueError("travel_to() takes an aware datetime, e.g. datetime(..., tzinfo=UTC)")
        await self.conn.execute(
            f"UPDATE {self.schema}.fake_clock SET shift = $1::timestamptz - now()", at
        )

    async def reset(self) -> None:
        await self.conn.execute(f"UPDATE {self.schema}.fake_clock SET shift = interval '0'")
