"""The ASGI app a Vercel Python function exports, around ``fk.asgi()``.

Vercel's Python runtime imports ``api/index.py`` (or ``app.py``, ...) and
serves its top-level ``app`` (an ASGI callable) with uvicorn; with Fluid
compute one instance serves concurrent requests, and it keeps running after
the response until the ASGI call returns or ``maxDuration`` is reached.  So:

* each request gets a time budget: the platform's deadline when the runtime
  exposes it (``vercel_runtime.get_deadline()``), else the configured
  ``maxDuration``, minus a safety margin;
* the tick route (``/api/flowkeeper/tick``) is what Vercel Cron calls, with a
  GET carrying ``Authorization: Bearer $CRON_SECRET``: on Vercel a missing
  ``CRON_SECRET`` is a configuration error, reported at import;
* when the last in-flight request of an instance ends, the Postgres pool is
  closed, so a suspended instance holds no connection.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from importlib import import_module

from starlette.types import ASGIApp, Receive, Scope, Send

from flowkeeper import FlowKeeper
from flowkeeper.endpoint import TIME_BUDGET_SCOPE_KEY
from flowkeeper.errors import ConfigurationError

logger = logging.getLogger("flowkeeper")

#: Vercel's default (and Hobby's maximum) maxDuration with Fluid compute, in seconds.
DEFAULT_MAX_DURATION = 300.0


def on_vercel() -> bool:
    """True inside a Vercel deployment (``VERCEL=1`` is set at build and run time)."""
    return os.environ.get("VERCEL") == "1"


def vercel_endpoint(path: str = "/api/flowkeeper") -> str | None:
    """The endpoint URL: ``FLOWKEEPER_ENDPOINT``, else the production domain + ``path``.

    ``VERCEL_PROJECT_PRODUCTION_URL`` is the project's production domain (no
    scheme), which Vercel sets in every deployment; None off Vercel.
    """
    explicit = os.environ.get("FLOWKEEPER_ENDPOINT")
    if explicit:
        return explicit
    domain = os.environ.get("VERCEL_PROJECT_PRODUCTION_URL")
    if domain:
        return f"https://{domain.strip('/')}/{path.strip('/')}"
    return None


def _platform_deadline() -> datetime | None:
    """The invocation deadline from Vercel's runtime, if this runtime exposes one."""
    try:
        runtime = import_module("vercel_runtime")
    except ModuleNotFoundError:
        return None
    accessor = getattr(runtime, "get_deadline", None)
    if not callable(accessor):
        return None
    try:
        value = accessor()
    except Exception:  # an older or changed runtime: fall back to maxDuration
        return None
    return value if isinstance(value, datetime) else None


class VercelApp:
    """An ASGI app for a Vercel function: ``app = flowkeeper_vercel.app(fk)``."""

    def __init__(
        self,
        fk: FlowKeeper,
        app: ASGIApp | None = None,
        *,
        max_duration: float | None = None,
        safety_margin: float = 5.0,
        require_cron_secret: bool | None = None,
        release_idle_connections: bool = True,
    ) -> None:
        if max_duration is None:
            raw = os.environ.get("FLOWKEEPER_MAX_DURATION")
            try:
                max_duration = float(raw) if raw else DEFAULT_MAX_DURATION
            except ValueError:
                raise ConfigurationError(
                    f"FLOWKEEPER_MAX_DURATION must be a number of seconds, got {raw!r}"
                ) from None
        if max_duration <= 0:
            raise ConfigurationError("max_duration must be positive (your maxDuration, seconds)")
        if safety_margin < 0:
            raise ConfigurationError("safety_margin must be zero or more seconds")
        if require_cron_secret is None:
            require_cron_secret = on_vercel()
        if require_cron_secret and not fk.cron_secret:
            raise ConfigurationError(
                "CRON_SECRET is not set: Vercel Cron authenticates the tick "
                "(/api/flowkeeper/tick) with 'Authorization: Bearer $CRON_SECRET', and without "
                "it sleeps and retries never resume. Add a CRON_SECRET environment variable "
                "(at least 16 random characters) to the project and redeploy."
            )
        self.fk = fk
        self.app: ASGIApp = app if app is not None else fk.asgi()
        self.max_duration = max_duration
        self.safety_margin = safety_margin
        self.release_idle_connections = release_idle_connections
        self._in_flight = 0

    def budget(self) -> float:
        """Seconds this request may still use for steps."""
        deadline = _platform_deadline()
        if deadline is not None:
            if deadline.tzinfo is None:
                deadline = deadline.replace(tzinfo=UTC)
            remaining = (deadline - datetime.now(UTC)).total_seconds()
        else:
            remaining = self.max_duration
        return max(0.001, remaining - self.safety_margin)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if TIME_BUDGET_SCOPE_KEY not in scope:
            scope = {**scope, TIME_BUDGET_SCOPE_KEY: self.budget()}
        self._in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._in_flight -= 1
            # The function may freeze once it answers: export the spans of this request.
            await self.fk.flush_telemetry()
            if self._in_flight == 0 and self.release_idle_connections:
                # No await between the check and the pool swap inside close():
                # a request arriving meanwhile makes a fresh pool.
                await self.fk.db.close()


def app(
    fk: FlowKeeper,
    app: ASGIApp | None = None,
    *,
    max_duration: float | None = None,
    safety_margin: float = 5.0,
    require_cron_secret: bool | None = None,
    release_idle_connections: bool = True,
) -> VercelApp:
    """Wrap ``fk.asgi()`` (or your app with it mounted) for a Vercel Python function.

    Export the result as ``app`` in ``api/index.py``.  ``max_duration`` is the
    function's ``maxDuration`` in seconds (default ``FLOWKEEPER_MAX_DURATION``,
    else 300); the runtime's own deadline is used instead when it exposes one.
    ``require_cron_secret`` defaults to True on Vercel.  Building it does no I/O.
    """
    return VercelApp(
        fk,
        app,
        max_duration=max_duration,
        safety_margin=safety_margin,
        require_cron_secret=require_cron_secret,
        release_idle_connections=release_idle_connections,
    )
