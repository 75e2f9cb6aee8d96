"""Outbox writes: act once the caller's own transaction is over."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg


async def transaction_ended(connection: asyncpg.Connection, *, give_up: float = 600.0) -> bool:
    """Wait until ``connection`` leaves its transaction; False after ``give_up`` seconds.

    Whether it committed is not known here: what was written in it is either
    there (and the push finds it) or not (and the push is refused, harmlessly).
    """
    deadline = time.monotonic() + give_up
    pause = 0.002
    while connection.is_in_transaction() and not connection.is_closed():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)
    return True
