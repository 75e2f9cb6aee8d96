"""``fk.sync``: flowkeeper from sync code (Django, Flask, scripts), from any thread.

The calls run on an event loop of flowkeeper's own, in one daemon thread
started on first use, with a twin of the FlowKeeper (same settings and
workflows) whose pool and HTTP client belong to that loop: the caller needs
no event loop, and an async FlowKeeper used in the same process keeps its own.
Any number of threads may call at once; each call blocks its thread only.

``trigger(..., connection=conn)`` with a sync psycopg 3 connection or Django's
``connection`` inserts the run in the caller's transaction, in the caller's
thread; with Django the run is pushed once the transaction commits
(``transaction.on_commit``), with psycopg the scheduler starts it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import weakref
from typing import TYPE_CHECKING, Any

from . import foreign
from .errors import ConfigurationError
from .ids import check_idempotency_key, new_run_id
from .models import RunHandle, RunInfo

if TYPE_CHECKING:
    from .client import FlowKeeper
    from .events import SentEvent

_live: weakref.WeakSet[SyncFlowKeeper] = weakref.WeakSet()


class SyncFlowKeeper:
    """Blocking versions of the FlowKeeper calls an app makes (see the module doc)."""

    def __init__(self, fk: FlowKeeper) -> None:
        self._fk = fk
        self._twin: FlowKeeper | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        _live.add(self)

    # the loop ---------------------------------------------------------------------------
    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None and self._thread is not None and self._thread.is_alive():
                return self._loop
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def main() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._thread = threading.Thread(target=main, name="flowkeeper-sync", daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
            return loop

    def _call(self, make: Any, timeout: float | None = None) -> Any:
        loop = self._start()
        if threading.current_thread() is self._thread:
            raise RuntimeError("fk.sync called from flowkeeper's own loop; await fk.<call> there")

        async def run() -> Any:
            return await make(self._own())

        future = asyncio.run_coroutine_threadsafe(run(), loop)
        return future.result(timeout)

    def _own(self) -> FlowKeeper:
        """The twin on this loop, with every workflow registered on the original so far."""
        if self._twin is None:
            self._twin = self._fk._copy_for_another_loop()
        for wf in self._fk.registry:
            if wf.name not in self._twin.registry:
                self._twin.register(wf)
        return self._twin

    # the API -----------------------------------------------------------------------------
    def trigger(
        self,
        workflow: Any,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        connection: Any = None,
    ) -> RunHandle:
        """:meth:`FlowKeeper.trigger`, blocking.  ``connection`` may also be a sync
        psycopg 3 connection or Django's connection (see the module doc)."""
        if connection is not None and foreign.kind(connection) in ("psycopg", "django"):
            return self._trigger_sync(workflow, input, idempotency_key, connection)

        async def go(fk: FlowKeeper) -> RunHandle:
            return await fk.trigger(
                workflow, input, idempotency_key=idempotency_key, connection=connection
            )

        handle: RunHandle = self._call(go)
        handle._fk = self._fk
        return handle

    def _trigger_sync(
        self, workflow: Any, input: Any, idempotency_key: str | None, connection: Any
    ) -> RunHandle:
        fk = self._fk
        wf = fk._workflow(workflow)
        input_json = wf.dump_input(input)
        key = check_idempotency_key(idempotency_key, wf.name)

        async def ready(twin: FlowKeeper) -> None:
            await twin.store.ensure_schema()

        self._call(ready)
        run_id, created = foreign.insert_run_sync(
            fk.store.q,
            connection,
            fk._foreign_insert(wf, new_run_id(), input_json, key, wf.priority),
        )
        if created:
            if foreign.sync_in_transaction(connection):
                foreign.after_commit(connection, lambda: self._push_quietly(run_id))
            else:
                self._push_quietly(run_id)
        return RunHandle(run_id=run_id, workflow=wf.name, created=created, _fk=fk)

    def _push_quietly(self, run_id: str) -> None:
        """Start a committed run now; if that fails it stays due for the scheduler."""

        async def go(fk: FlowKeeper) -> None:
            if fk.dispatcher is not None:
                await fk.dispatcher.invoke(run_id, None)

        self._call(go)

    def get_run(self, run_id: str) -> RunInfo:
        """:meth:`FlowKeeper.get_run`, blocking."""

        async def go(fk: FlowKeeper) -> RunInfo:
            return await fk.get_run(run_id)

        result: RunInfo = self._call(go)
        return result

    def cancel(self, run_id: str, *, reason: str | None = None) -> bool:
        """:meth:`FlowKeeper.cancel`, blocking."""

        async def go(fk: FlowKeeper) -> bool:
            return await fk.cancel(run_id, reason=reason)

        return bool(self._call(go))

    def result(self, run_id: str, *, timeout: float | None = None) -> Any:
        """:meth:`FlowKeeper.result`, blocking (``timeout`` as there)."""

        async def go(fk: FlowKeeper) -> Any:
            return await fk.result(run_id, timeout=timeout)

        return self._call(go)

    def send_event(
        self, name: str, data: Any = None, *, id: str | None = None, connection: Any = None
    ) -> SentEvent:
        """:meth:`FlowKeeper.send_event`, blocking (``connection`` an asyncpg one, if any)."""
        if connection is not None and foreign.kind(connection) != "asyncpg":
            raise ConfigurationError(
                "send_event(connection=...) takes an asyncpg connection; from sync code send "
                "the event after your transaction commits (e.g. Django's transaction.on_commit)."
            )

        async def go(fk: FlowKeeper) -> SentEvent:
            return await fk.send_event(name, data, id=id, connection=connection)

        result: SentEvent = self._call(go)
        return result

    def complete_token(self, token_id: str, data: Any = None) -> str:
        """:meth:`FlowKeeper.complete_token`, blocking."""

        async def go(fk: FlowKeeper) -> str:
            return await fk.complete_token(token_id, data)

        return str(self._call(go))

    def close(self) -> None:
        """Close the pool and the client, and stop the loop (it restarts on next use)."""
        with self._lock:
            loop, thread, twin = self._loop, self._thread, self._twin
            self._loop = self._thread = self._twin = None
        if loop is None or thread is None or not thread.is_alive():
            return
        if twin is not None:
            done = asyncio.run_coroutine_threadsafe(twin.aclose(), loop)
            with contextlib.suppress(Exception):  # best effort: the process may be going away
                done.result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()


@atexit.register
def _close_all() -> None:
    for sync in list(_live):
        sync.close()
