"""The Lambda handler: one function serves HTTP, scheduled ticks and direct invocations.

Lambda runs one invocation at a time per execution environment and freezes
the environment between invocations.  So the handler:

* keeps one event loop for the environment (mangum's HTTP cycle and the
  tick/advance paths all run on it), so a module-level ``FlowKeeper`` is
  reused across invocations;
* caps the connection pool (2 by default: the engine's writes plus its
  lease heartbeat) and closes it, with the HTTP client, at the end of every
  invocation — a frozen environment holds no Postgres connection, so a
  thousand idle environments cannot exhaust ``max_connections``;
* hands the engine the invocation's remaining time
  (``context.get_remaining_time_in_millis()``) minus a safety margin, so a run
  is handed on before Lambda stops the function.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from flowkeeper import FlowKeeper
from flowkeeper.endpoint import TIME_BUDGET_SCOPE_KEY
from flowkeeper.engine import ClaimRefused
from flowkeeper.errors import ConfigurationError
from flowkeeper.signing import SIGNATURE_HEADER

from .events import decode_invocation, infer, parse_advance
from .invoke import InvokeClient, LambdaInvokeDispatcher

logger = logging.getLogger("flowkeeper")

LifespanMode = Literal["auto", "on", "off"]


class LambdaHandler:
    """``handler(event, context)`` for a Lambda function serving flowkeeper.

    Build it with :func:`flowkeeper_aws_lambda.handler`.
    """

    def __init__(
        self,
        fk: FlowKeeper,
        app: ASGIApp | None = None,
        *,
        safety_margin: float = 10.0,
        max_connections: int = 2,
        keep_connections: bool = False,
        lifespan: LifespanMode = "off",
        api_gateway_base_path: str = "/",
        self_invoke: bool | None = None,
        function_name: str | None = None,
        endpoint_path: str = "/api/flowkeeper",
        lambda_client: InvokeClient | None = None,
    ) -> None:
        if safety_margin < 0:
            raise ConfigurationError("safety_margin must be zero or more seconds")
        if max_connections < 1:
            raise ConfigurationError("max_connections must be at least 1")
        if lifespan not in ("auto", "on", "off"):
            raise ConfigurationError('lifespan must be "auto", "on" or "off"')
        self.fk = fk
        self.safety_margin = safety_margin
        self.keep_connections = keep_connections
        if fk.db.max_size > max_connections:
            # The pool is made lazily, so this takes effect on first use.
            fk.db.max_size = max_connections
        if self_invoke is None:
            self_invoke = fk.dispatcher is None
        if self_invoke:
            name = function_name or os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "")
            fk.dispatcher = LambdaInvokeDispatcher(
                name, fk.signer, base_path=endpoint_path, client=lambda_client
            )
        if app is None:
            # Mounted at the path the function sees, which differs from the public
            # endpoint path behind an API Gateway stage or a custom domain mapping.
            app = Starlette(routes=[Mount(endpoint_path.rstrip("/"), app=fk.asgi())])
        self.app: ASGIApp = _BudgetMiddleware(app, self._budget_from_context)
        self.lifespan: LifespanMode = lifespan
        self.api_gateway_base_path = api_gateway_base_path
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mangum: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None

    # budget ------------------------------------------------------------------------
    def _budget_from_context(self, context: Any) -> float | None:
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        if remaining is None:
            return None
        return max(0.001, float(remaining()) / 1000.0 - self.safety_margin)

    # the event loop ------------------------------------------------------------------
    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        # mangum runs the app on asyncio.get_event_loop(): make it this one.
        asyncio.set_event_loop(self._loop)
        return self._loop

    def _run(self, coro: Awaitable[Any]) -> Any:
        return self._event_loop().run_until_complete(coro)

    # the handler ---------------------------------------------------------------------
    def __call__(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        kind = infer(event)
        started = time.monotonic()
        try:
            if kind == "http":
                return self._http(event, context)
            if kind == "tick":
                result = self._run(self.fk.tick())
                logger.info(
                    "lambda tick: claimed %d, dispatched %d, failed %d",
                    result.claimed,
                    result.dispatched,
                    result.failed,
                )
                return {
                    "claimed": result.claimed,
                    "dispatched": result.dispatched,
                    "failed": result.failed,
                }
            return self._advance(event, context, started)
        finally:
            if not self.keep_connections:
                self._run(self.fk.aclose())  # exports finished spans too
            else:  # the process freezes after return: spans still buffered would be lost
                self._run(self.fk.flush_telemetry())

    def close(self) -> None:
        """Release everything and close the event loop (tests, local runs; not Lambda)."""
        if self._loop is not None and not self._loop.is_closed():
            self._run(self.fk.aclose())
            self._loop.close()
        self._loop = None
        self._mangum = None

    def _http(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        if self._mangum is None:
            self._event_loop()  # before Mangum() looks for a loop
            from mangum import Mangum

            self._mangum = Mangum(
                self.app,  # type: ignore[arg-type]  # mangum's ASGI protocol is narrower
                lifespan=self.lifespan,
                api_gateway_base_path=self.api_gateway_base_path,
            )
        else:
            self._event_loop()
        return self._mangum(event, context)

    def _advance(self, event: dict[str, Any], context: Any, started: float) -> dict[str, Any]:
        request = parse_advance(event)
        dispatcher = self.fk.dispatcher
        base = dispatcher.base_path if dispatcher is not None else ""
        # Raises SignatureError (the invocation fails, visibly) when not ours.
        self.fk.signer.verify(
            method="POST",
            paths=[base + "/"],
            body=request.body,
            headers={SIGNATURE_HEADER: request.signature},
        )
        run_id, lease = decode_invocation(request.body)
        budget = self._budget_from_context(context)
        if budget is not None:
            budget = max(0.001, budget - (time.monotonic() - started))
        outcome = self._run(self.fk.advance(run_id, lease, time_budget=budget))
        if isinstance(outcome, ClaimRefused):
            return {
                "run_id": run_id,
                "accepted": False,
                "reason": outcome.reason,
                "status": outcome.status,
            }
        return {
            "run_id": run_id,
            "accepted": True,
            "outcome": outcome.outcome.value,
            "status": outcome.status,
            "steps_executed": outcome.steps_executed,
        }


class _BudgetMiddleware:
    """Puts the invocation's remaining time (from mangum's ``aws.context``) in the scope."""

    def __init__(self, app: ASGIApp, budget: Callable[[Any], float | None]) -> None:
        self.app = app
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = scope.get("aws.context")
        if scope["type"] == "http" and context is not None and TIME_BUDGET_SCOPE_KEY not in scope:
            seconds = self.budget(context)
            if seconds is not None:
                scope = {**scope, TIME_BUDGET_SCOPE_KEY: seconds}
        await self.app(scope, receive, send)


def handler(
    fk: FlowKeeper,
    app: ASGIApp | None = None,
    *,
    safety_margin: float = 10.0,
    max_connections: int = 2,
    keep_connections: bool = False,
    lifespan: LifespanMode = "off",
    api_gateway_base_path: str = "/",
    self_invoke: bool | None = None,
    function_name: str | None = None,
    endpoint_path: str = "/api/flowkeeper",
    lambda_client: InvokeClient | None = None,
) -> LambdaHandler:
    """The Lambda entry point for ``fk``: ``handler = flowkeeper_aws_lambda.handler(fk)``.

    - HTTP events (function URL, API Gateway REST/HTTP, ALB) go through mangum
      to ``app`` (default ``fk.asgi()``, which serves ``/api/flowkeeper``; pass
      your own Starlette/FastAPI app with the endpoint mounted to serve both).
    - EventBridge scheduled events and ``{"flowkeeper": {"action": "tick"}}``
      run a scheduler tick.
    - A signed ``{"flowkeeper": {"action": "advance", ...}}`` advances one run.

    The engine's time budget is the invocation's remaining time minus
    ``safety_margin`` seconds (keep it above your longest step).  At most
    ``max_connections`` Postgres connections are used per invocation, and all
    are closed when it ends unless ``keep_connections=True``.

    Without ``FLOWKEEPER_ENDPOINT`` (``self_invoke=None``), runs are pushed by
    invoking this same function asynchronously (``AWS_LAMBDA_FUNCTION_NAME``);
    with an endpoint URL they are posted over HTTP.  Nothing touches the
    network or the database until the first invocation.
    """
    return LambdaHandler(
        fk,
        app,
        safety_margin=safety_margin,
        max_connections=max_connections,
        keep_connections=keep_connections,
        lifespan=lifespan,
        api_gateway_base_path=api_gateway_base_path,
        self_invoke=self_invoke,
        function_name=function_name,
        endpoint_path=endpoint_path,
        lambda_client=lambda_client,
    )
