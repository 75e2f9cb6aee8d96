"""A run's stream: progress and partial results, published by the run, read live.

``ctx.publish(topic, data)`` appends a message to the run's stream; messages
are kept in Postgres (``stream_messages``), ordered per run by a cursor (their
id), at most ``stream_max_messages`` per run (past the cap one
``flowkeeper.truncated`` message is appended and later ones are dropped, with
a warning in the log).  They are written in batches: a background flush picks
up whatever was published in the last few milliseconds, and every write the
engine makes for the run flushes first, so a step's messages are stored
before its result.

A message published inside a step carries the step's key and attempt; read
back, each says whether its attempt is ``final`` (the attempt whose result was
recorded, or published outside any step), ``superseded`` (an attempt that
failed, or died with its process) or still ``pending``.  Published from the
workflow function itself (outside a step), a message is sent when the run
reaches it for the first time, not again when the function replays.

``fk.stream(run_id)`` yields the messages already there, then new ones live
(LISTEN/NOTIFY on a connection of its own; short polling behind transaction
poolers) until the run ends; ``after=`` resumes from a cursor.  With
``final_only=True`` it holds back messages whose attempt is pending and skips
superseded ones, so a reader sees each step's output once, from the attempt
that counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from itsdangerous import BadSignature, Signer

from .errors import StepUsageError, StreamTokenError
from .names import name_problem, shown
from .serialization import dumps
from .signing import KeyInput, normalize_keys

if TYPE_CHECKING:
    from .store import Store

logger = logging.getLogger("flowkeeper")

MAX_TOPIC = 200
TRUNCATED_TOPIC = "flowkeeper.truncated"
_FINISHED = ("completed", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class StreamMessage:
    """One message of a run's stream."""

    cursor: int  # pass as after= to resume after this message
    topic: str
    data: Any
    step: str | None  # the step that published it (None: the workflow function)
    attempt: int | None
    at: datetime
    finality: str  # "final" | "superseded" | "pending"

    def as_json(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "topic": self.topic,
            "data": self.data,
            "step": self.step,
            "attempt": self.attempt,
            "at": self.at.isoformat(),
            "finality": self.finality,
        }


def check_topic(topic: object) -> str:
    problem = name_problem(topic, MAX_TOPIC)
    if problem is not None:
        raise StepUsageError(f"The stream topic {shown(topic)} {problem}.")
    assert isinstance(topic, str)
    return topic


class Publisher:
    """The messages one invocation of a run publishes, written in batches."""

    def __init__(
        self,
        store: Store,
        run_id: str,
        *,
        max_messages: int,
        max_bytes: int,
        delay: float = 0.005,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.delay = delay
        self._pending: list[tuple[str, str | None, int | None, str]] = []
        self._lock = threading.Lock()  # publish_nowait may be called from step threads
        self._stored: int | None = None  # messages the run has, once known
        self._truncated = False
        self._flusher: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._flushing = asyncio.Lock()

    def add(self, topic: str, data: Any, step: str | None, attempt: int | None) -> None:
        """Queue a message (checked now: a bad one raises here, in the caller)."""
        check_topic(topic)
        text = dumps(data, what=f"The data published to stream topic {topic!r}")
        if len(text) > self.max_bytes:
            raise StepUsageError(
                f"The message published to {topic!r} is {len(text)} bytes of JSON; the limit "
                f"is {self.max_bytes}. Publish a summary, or a reference to where the data is."
            )
        with self._lock:
            self._pending.append((topic, step, attempt, text))
        self._loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = self._loop.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self.delay)  # gather what is published meanwhile into one write
        try:
            await self.flush()
        except Exception as exc:  # the next engine write flushes (and fails) for sure
            logger.warning("run %s: writing stream messages failed: %s", self.run_id, exc)

    async def flush(self) -> None:
        """Write what was published so far (called before every write of the engine)."""
        async with self._flushing:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            if self._stored is None:
                self._stored = await self.store.stream_count(self.run_id)
            room = self.max_messages - self._stored
            if len(batch) > room:
                kept = batch[: max(0, room - 1)] if room > 0 else []
                if not self._truncated and room > 0:
                    dropped = len(batch) - len(kept)
                    logger.warning(
                        "run %s: its stream reached %d messages; %d and any later are dropped",
                        self.run_id,
                        self.max_messages,
                        dropped,
                    )
                    kept.append(
                        (TRUNCATED_TOPIC, None, None, f'{{"max_messages": {self.max_messages}}}')
                    )
                    self._truncated = True
                batch = kept
            if batch:
                await self.store.stream_append(self.run_id, batch)
                self._stored += len(batch)

    async def close(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flusher
        with contextlib.suppress(Exception):
            await self.flush()


class StreamReader:
    """``fk.stream``: the messages of a run, then live ones until it ends."""

    def __init__(self, store: Store, schema: str, *, poll_interval: float = 0.25) -> None:
        self.store = store
        self.schema = schema
        self.poll_interval = poll_interval

    async def read(
        self,
        run_id: str,
        *,
        topic: str | None = None,
        after: int = 0,
        final_only: bool = False,
        follow: bool = True,
        batch: int = 500,
    ) -> AsyncGenerator[StreamMessage, None]:
        cursor = after
        wake = asyncio.Event()
        listener = await self._listen(run_id, wake) if follow else None
        try:
            while True:
                wake.clear()
                status = await self.store.stream_run_status(run_id)
                if status is None:
                    return
                rows = await self.store.stream_read(run_id, cursor, topic, batch)
                held = False
                for row in rows:
                    message = _message(row)
                    if final_only and message.finality == "pending":
                        if status not in _FINISHED:
                            held = True
                            break
                        # The run ended while that attempt ran: it never counted.
                        message = StreamMessage(**{**_fields(message), "finality": "superseded"})
                    cursor = message.cursor
                    if final_only and message.finality == "superseded":
                        continue
                    yield message
                if len(rows) == batch and not held:
                    continue  # more are there already
                if status in _FINISHED and not held:
                    # A last look: messages written just before the run ended.
                    if len(rows) == 0 or not follow:
                        return
                    continue
                if not follow:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.poll_interval)
        finally:
            if listener is not None:
                await listener()

    async def _listen(self, run_id: str, wake: asyncio.Event) -> Any:
        """LISTEN for the run's messages where the connection allows it (not behind a pooler)."""
        db = self.store.db
        if db.pooled:
            return None
        try:
            conn = await db.connect()
        except Exception as exc:
            logger.info("stream of run %s: polling (LISTEN unavailable: %s)", run_id, exc)
            return None
        wanted = f"{self.schema} {run_id}"

        def notified(_conn: Any, _pid: int, _channel: str, payload: object) -> None:
            if payload == wanted:
                wake.set()

        await conn.add_listener("flowkeeper_stream", notified)

        async def stop() -> None:
            with contextlib.suppress(Exception):
                await conn.close()

        return stop


def _fields(message: StreamMessage) -> dict[str, Any]:
    return {name: getattr(message, name) for name in StreamMessage.__slots__}


def _message(row: Any) -> StreamMessage:
    import json

    return StreamMessage(
        cursor=int(row["id"]),
        topic=row["topic"],
        data=json.loads(row["data"]),
        step=row["step_key"],
        attempt=row["attempt"],
        at=row["at"],
        finality=row["finality"],
    )


class StreamTokens:
    """Short-lived read tokens for one run's stream (what a browser is given)."""

    def __init__(self, keys: KeyInput) -> None:
        self._signer = Signer(list(reversed(normalize_keys(keys))), salt="flowkeeper.stream")

    def make(self, run_id: str, ttl: float) -> str:
        expires = int(time.time() + ttl)
        return self._signer.sign(f"{run_id}.{expires}").decode()

    def check(self, token: str, run_id: str) -> None:
        """Raise StreamTokenError unless ``token`` reads ``run_id``'s stream now."""
        if not isinstance(token, str) or not token or len(token) > 300:
            raise StreamTokenError(
                "A stream read token is needed (?token=... made by fk.stream_token)."
            )
        try:
            value = self._signer.unsign(token).decode()
        except (BadSignature, UnicodeDecodeError, ValueError):
            raise StreamTokenError(
                "The stream read token is not valid (forged or altered)."
            ) from None
        rid, _, expires = value.rpartition(".")
        if rid != run_id:
            raise StreamTokenError("The stream read token is for another run.")
        if not expires.isdigit() or int(expires) < time.time():
            raise StreamTokenError("The stream read token has expired; ask the app for a new one.")
