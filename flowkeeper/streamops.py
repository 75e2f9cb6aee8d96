"""Reading a run's stream from application code (a FlowKeeper mixin)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING

from .errors import ConfigurationError, RunNotFoundError
from .ids import check_run_id
from .streams import StreamMessage, StreamReader, StreamTokens

if TYPE_CHECKING:
    from .store import Store


class StreamOperations:
    """``stream``, ``read_stream``, ``stream_token`` (methods of FlowKeeper)."""

    store: Store
    schema: str
    stream_tokens: StreamTokens

    async def stream(
        self,
        run_id: str,
        *,
        topic: str | None = None,
        after: int = 0,
        final_only: bool = False,
    ) -> AsyncIterator[StreamMessage]:
        """The run's messages from cursor ``after``, then live ones until the run ends.

        ``async for message in fk.stream(run_id): ...``.  Resume after a
        disconnect with ``after=message.cursor`` of the last one seen: nothing
        is missed and nothing repeated.  ``final_only`` leaves out messages of
        attempts that failed and holds back those of a step still running.
        """
        rid = check_run_id(run_id)
        if await self.store.stream_run_status(rid) is None:
            raise RunNotFoundError(run_id)
        reader = StreamReader(self.store, self.schema)
        async for message in reader.read(rid, topic=topic, after=after, final_only=final_only):
            yield message

    async def read_stream(
        self,
        run_id: str,
        *,
        topic: str | None = None,
        after: int = 0,
        final_only: bool = False,
        limit: int = 500,
        wait: float = 0.0,
    ) -> tuple[list[StreamMessage], bool]:
        """The messages there now, and whether the run has finished (long polling).

        With ``wait`` (seconds, at most 30) and nothing new yet, waits up to
        that long for the next message before answering.
        """
        rid = check_run_id(run_id)
        status = await self.store.stream_run_status(rid)
        if status is None:
            raise RunNotFoundError(run_id)
        reader = StreamReader(self.store, self.schema)
        messages = [
            m
            async for m in reader.read(
                rid, topic=topic, after=after, final_only=final_only, follow=False, batch=limit
            )
        ][:limit]
        finished = status in ("completed", "failed", "cancelled")
        if not messages and not finished and wait > 0:
            live = reader.read(rid, topic=topic, after=after, final_only=final_only)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, 30.0)):
                    async for message in live:
                        messages.append(message)
                        break
            await live.aclose()
            status = await self.store.stream_run_status(rid)
            finished = status in ("completed", "failed", "cancelled")
        return messages, finished

    async def check_stream(self, run_id: str) -> None:
        """Raise RunNotFoundError unless the run exists."""
        if await self.store.stream_run_status(check_run_id(run_id)) is None:
            raise RunNotFoundError(run_id)

    def stream_token(self, run_id: str, *, ttl: float | timedelta = timedelta(minutes=15)) -> str:
        """A read token for ``GET <endpoint>/runs/<run_id>/stream?token=...``.

        Hand it to your own browser for one run; it expires after ``ttl`` and
        reads nothing else.  The signing key itself never leaves the server.
        """
        seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
        if not 0 < seconds <= 7 * 86400:
            raise ConfigurationError(f"stream_token ttl must be within 7 days, got {ttl!r}")
        return self.stream_tokens.make(check_run_id(run_id), seconds)
