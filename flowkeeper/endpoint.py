"""The HTTP endpoint: a Starlette app to mount at ``/api/flowkeeper``.

Routes (relative to the mount point):

``POST /``       a signed invocation ``{"run_id": ..., "lease": ...}``: claim
                 the run, answer 202, then execute its steps in the same ASGI
                 call while the time budget lasts.  With ``"wait": true`` the
                 answer comes after the segment, with its outcome.
``GET|POST /tick``  run a scheduler tick; ``Authorization: Bearer <CRON_SECRET>``
                 or a signature.
``GET /``        liveness: answers without touching the database.
``/ui/...``      the dashboard (``dashboard_path``; see :mod:`flowkeeper.dashboard`).

The endpoint knows nothing of SQL: it verifies, parses and delegates to the
``FlowKeeper`` object (engine, scheduler).  Every refusal is JSON
``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import __version__, gcpolicy, health, observe
from .boundary import check_text, parse_json
from .engine import ClaimRefused, Outcome
from .errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseRefusedError,
    InvalidEventError,
    InvalidRequestError,
    RunNotFoundError,
    SignatureError,
    StepUsageError,
    StreamTokenError,
    TokenError,
    WorkflowError,
)
from .store import ClaimedRun
from .streams import check_topic
from .workflow import validate_name

if TYPE_CHECKING:
    from .client import FlowKeeper

logger = logging.getLogger("flowkeeper")

#: A host may put the seconds it still allows this request under this scope key
#: (the Lambda and Vercel adapters do); the engine's budget never exceeds it.
TIME_BUDGET_SCOPE_KEY = "flowkeeper.time_budget"

TimeBudgetHook = Callable[[Scope], float | None]


class _BodyTooLarge(Exception):
    pass


def error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}, **extra}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes early."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _BodyTooLarge
        except ValueError:
            pass
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(request: Request, limit: int) -> JSONResponse:
    return refuse(
        request,
        413,
        "payload_too_large",
        f"Request body is larger than the limit of {limit} bytes. Invocations carry only a "
        "run id and a lease token; large data belongs in the run's input.",
    )


def refuse(request: Request, status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    """A refused request: the JSON error, and one WARNING line saying who and why."""
    client = request.client.host if request.client else "unknown"
    logger.warning(
        "endpoint refused %s %s from %s: %d %s: %s",
        request.method,
        request.scope.get("path", ""),
        client,
        status,
        code,
        message,
    )
    return error(status, code, message, **extra)


class PrefixMiddleware:
    """Serve the routes under the endpoint's own path when the app is not mounted.

    Mounted (``app.mount("/api/flowkeeper", fk.asgi())``) the routes see
    ``/`` and ``/tick`` already.  Served on its own (uvicorn, a Vercel function,
    a Lambda function URL) the app sees the full path ``/api/flowkeeper/...``:
    this moves the configured prefix into ``root_path``.
    """

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.prefix:
            root = scope.get("root_path", "")
            path: str = scope["path"]
            route = path[len(root) :] if root and path.startswith(root) else path
            if route == self.prefix or route.startswith(self.prefix + "/"):
                scope = dict(scope)
                scope["root_path"] = root + self.prefix
                if route == self.prefix:
                    scope["path"] = path + "/"
        await self.app(scope, receive, send)


class TokenRoutes:
    """``POST /tokens/<signed id>``: complete an approval token with the JSON body."""

    fk: FlowKeeper

    async def complete_token(self, request: Request) -> Response:
        signed = request.path_params["token"]
        limit = self.fk.max_body_bytes
        try:
            body = await read_body(request, limit)
        except _BodyTooLarge:
            return _too_large(request, limit)
        try:
            data = parse_json(body, what="The token's body") if body.strip() else None
        except InvalidRequestError as exc:
            return refuse(request, 400, "invalid_body", str(exc))
        try:
            run_id = await self.fk.complete_token(signed, data)
        except TokenError as exc:
            code = {404: "token_not_found", 409: "token_completed", 410: "token_expired"}
            return refuse(request, exc.status, code.get(exc.status, "token_error"), str(exc))
        except (InvalidEventError, DatabaseRefusedError) as exc:
            return refuse(request, 400, "invalid_body", str(exc))
        except DatabaseError as exc:
            return error(503, "database_unavailable", str(exc))
        return JSONResponse({"ok": True, "run_id": run_id, "message": "Thank you: recorded."})

    async def token_info(self, request: Request) -> Response:
        return error(
            405,
            "method_not_allowed",
            "POST to this URL (a JSON body becomes the waiting run's result) to complete the "
            "approval token.",
        )


class StreamRoutes:
    """``GET /runs/<id>/stream``: the run's stream as server-sent events, or polled JSON.

    Authorised by a read token from ``fk.stream_token(run_id)`` (``?token=``
    or ``Authorization: Bearer``).  ``Last-Event-ID`` (or ``?after=``) resumes
    after a cursor.  ``?mode=poll`` (or ``Accept: application/json``) answers
    at once with the messages there, the next cursor and whether the run has
    finished: for hosts that buffer responses (AWS Lambda behind Mangum).
    """

    fk: FlowKeeper

    async def stream(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        try:
            run_id = str(uuid.UUID(run_id))
        except ValueError:
            return refuse(request, 404, "run_not_found", "No run with this id exists.")
        query = request.query_params
        token = query.get("token") or ""
        auth = request.headers.get("authorization", "")
        if not token and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        try:
            self.fk.stream_tokens.check(token, run_id)
        except StreamTokenError as exc:
            return refuse(request, 401, "invalid_stream_token", str(exc))
        raw_after = request.headers.get("last-event-id") or query.get("after") or "0"
        topic = query.get("topic") or None
        if not raw_after.isdigit() or len(raw_after) > 18:
            return refuse(request, 400, "invalid_cursor", "after/Last-Event-ID must be a cursor.")
        if topic is not None:
            try:
                check_topic(topic)
            except StepUsageError as exc:
                return refuse(request, 400, "invalid_topic", str(exc))
        final_only = query.get("final", "") in ("1", "true", "yes")
        after = int(raw_after)
        poll = query.get("mode") == "poll" or (
            "application/json" in request.headers.get("accept", "")
            and "text/event-stream" not in request.headers.get("accept", "")
        )
        try:
            if poll:
                raw_wait = query.get("wait", "0")
                if not raw_wait.isdigit() or int(raw_wait) > 30:
                    return refuse(request, 400, "invalid_wait", "wait is whole seconds, 0 to 30.")
                messages, finished = await self.fk.read_stream(
                    run_id, topic=topic, after=after, final_only=final_only, wait=int(raw_wait)
                )
                cursor = messages[-1].cursor if messages else after
                return JSONResponse(
                    {
                        "messages": [m.as_json() for m in messages],
                        "cursor": cursor,
                        "finished": finished and not messages,
                    }
                )
            await self.fk.check_stream(run_id)
        except RunNotFoundError:
            return refuse(request, 404, "run_not_found", f"No run {run_id} exists.")
        except DatabaseError as exc:
            return error(503, "database_unavailable", str(exc))
        return StreamingResponse(
            self._events(run_id, topic, after, final_only),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(
        self, run_id: str, topic: str | None, after: int, final_only: bool
    ) -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        stream = self.fk.stream(run_id, topic=topic, after=after, final_only=final_only)
        try:
            async for message in stream:
                body = json.dumps(message.as_json(), default=str)
                yield f"id: {message.cursor}\nevent: {message.topic}\ndata: {body}\n\n"
            yield "event: end\ndata: {}\n\n"
        except DatabaseError as exc:
            yield f"event: error\ndata: {json.dumps({'message': str(exc)})}\n\n"


class Endpoint(TokenRoutes, StreamRoutes):
    """Request handlers bound to one FlowKeeper."""

    def __init__(self, fk: FlowKeeper, *, time_budget: TimeBudgetHook | None = None) -> None:
        self.fk = fk
        self.time_budget_hook = time_budget
        self.base_path = fk.dispatcher.base_path if fk.dispatcher else None

    # signatures -------------------------------------------------------------
    def _paths(self, request: Request, suffix: str) -> list[str]:
        """Every name under which this route may legitimately have been signed."""
        scope = request.scope
        seen = scope.get("path", "/")
        root = scope.get("root_path", "")
        candidates = [seen]
        if root and not seen.startswith(root):
            candidates.append(root.rstrip("/") + seen)
        if self.base_path is not None:
            candidates.append(self.base_path + (suffix or "/"))
        return candidates

    def _verify(self, request: Request, body: bytes, suffix: str) -> None:
        self.fk.signer.verify(
            method=request.method,
            paths=self._paths(request, suffix),
            body=body,
            headers=request.headers,
        )

    def _budget(self, scope: Scope) -> float | None:
        budget = scope.get(TIME_BUDGET_SCOPE_KEY)
        if budget is None and self.time_budget_hook is not None:
            budget = self.time_budget_hook(scope)
        return float(budget) if budget is not None else None

    # routes -----------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "service": "flowkeeper", "version": __version__})

    async def invoke(self, request: Request) -> Response:
        started = time.monotonic()
        limit = self.fk.max_body_bytes
        try:
            body = await read_body(request, limit)
        except _BodyTooLarge:
            return _too_large(request, limit)
        try:
            self._verify(request, body, "")
        except SignatureError as exc:
            return refuse(request, 401, exc.code, str(exc))
        try:
            run_id, lease, wait, create = _parse_invocation(body)
        except InvalidRequestError as exc:
            return refuse(request, 400, "invalid_body", str(exc))
        # The serving app is where schedules are declared: write them once.
        await self.fk.reconcile_once(authoritative=True)
        trace = _carried_trace(body) if self.fk.tracer is not None else None
        budget = self._budget(request.scope)
        # How long this invocation may wait for a rate-limited run's start time
        # that a late wake takes (flowkeeper.flowcontrol): half its budget.
        reach = min(budget or math.inf, self.fk.time_budget.total_seconds()) / 2
        try:
            if create is not None:
                claim = await self.fk.engine.create(run_id, *create, reach=reach)
            else:
                claim = await self.fk.engine.claim(run_id, lease, reach=reach)
            if isinstance(claim, ClaimRefused) and wait:
                # A start time near enough is waited for here, then claimed.
                claim = await self.fk.engine.claim_when_due(claim, reach=reach)
        except DatabaseRefusedError as exc:
            return refuse(request, 400, "invalid_value", str(exc))
        except DatabaseError as exc:
            logger.error("invocation of run %s: %s", run_id, exc)
            return error(503, "database_unavailable", str(exc), run_id=run_id)
        if isinstance(claim, str):  # the idempotency key belongs to that run
            return JSONResponse(
                {"run_id": claim, "accepted": False, "created": False, "reason": "idempotency_key"}
            )
        if budget is not None:
            budget = max(0.001, budget - (time.monotonic() - started))
        if isinstance(claim, ClaimRefused):
            starts_in = None if wait else self.fk.engine.start_wait(claim, reach)
            if starts_in is None:  # (a waiting caller has had its wait)
                return _refused(claim)
            # Throttled until a time near enough: accepted, claimed and run then.
            return JSONResponse(
                {
                    "run_id": run_id,
                    "accepted": True,
                    "status": "queued",
                    "created": create is not None,
                    "starts_in": round(starts_in, 3),
                },
                status_code=202,
                background=BackgroundTask(self._start_later, claim, reach, budget, trace),
            )
        if wait or not self.fk.engine.knows(claim.workflow):
            with observe.incoming_trace(trace):
                return await self._execute_now(claim, budget)
        return JSONResponse(
            {
                "run_id": run_id,
                "accepted": True,
                "status": "running",
                "created": create is not None,
            },
            status_code=202,
            background=BackgroundTask(self._execute_later, claim, budget, trace),
        )

    async def _execute_now(self, claim: ClaimedRun, budget: float | None) -> Response:
        try:
            result = await self.fk.execute_claimed(claim, time_budget=budget)
        except DatabaseError as exc:
            logger.error("run %s: %s", claim.run_id, exc)
            return error(503, "database_unavailable", str(exc), run_id=claim.run_id)
        if result.deferral is not None:
            # A rolling deploy: this instance does not know the workflow (yet). The run
            # is not failed but deferred; an answer, not a dispatch failure (no second
            # backoff in the scheduler or pg_cron).
            return JSONResponse(
                {
                    "run_id": claim.run_id,
                    "accepted": True,
                    "outcome": result.outcome.value,
                    "status": result.status,
                    "steps_executed": 0,
                    "deferred": result.deferral.as_json(),
                }
            )
        if result.outcome is Outcome.FAILED and not self.fk.engine.knows(claim.workflow):
            # Unknown for longer than unknown_workflow_grace: failed for good.
            message = (result.error or {}).get("message", "unknown workflow")
            return error(404, "unknown_workflow", message, run_id=claim.run_id, run_status="failed")
        payload: dict[str, Any] = {
            "run_id": claim.run_id,
            "accepted": True,
            "outcome": result.outcome.value,
            "status": result.status,
            "steps_executed": result.steps_executed,
        }
        if result.error:
            payload["error"] = {
                "type": result.error.get("type"),
                "message": result.error.get("message"),
            }
        return JSONResponse(payload)

    async def _start_later(
        self,
        refused: ClaimRefused,
        reach: float,
        budget: float | None,
        trace: dict[str, str] | None,
    ) -> None:
        started = time.monotonic()
        try:
            claim = await self.fk.engine.claim_when_due(refused, reach=reach)
        except DatabaseError as exc:
            logger.error("run %s: %s (a driver starts it when due)", refused.run_id, exc)
            return
        if isinstance(claim, ClaimRefused):
            logger.debug("run %s: not claimed at its start time (%s)", refused.run_id, claim.reason)
            return
        if budget is not None:
            budget = max(0.001, budget - (time.monotonic() - started))
        await self._execute_later(claim, budget, trace)

    async def _execute_later(
        self, claim: ClaimedRun, budget: float | None, trace: dict[str, str] | None = None
    ) -> None:
        try:
            with observe.incoming_trace(trace):
                await self.fk.execute_claimed(claim, time_budget=budget)
        except DatabaseError as exc:
            logger.error(
                "run %s stopped: %s (it resumes when its lease expires)", claim.run_id, exc
            )
        except Exception:
            logger.exception("run %s: unexpected error in the flowkeeper engine", claim.run_id)

    async def metrics(self, request: Request) -> Response:
        """Prometheus text of the database gauges (flowkeeper.metrics); off without a token."""
        token = self.fk.metrics_token
        if token is None:
            return refuse(
                request,
                404,
                "metrics_off",
                "The metrics endpoint is off: set FlowKeeper(metrics_token=...) or "
                "FLOWKEEPER_METRICS_TOKEN and scrape with 'Authorization: Bearer <token>'.",
            )
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            response = refuse(
                request,
                401,
                "invalid_metrics_token",
                "Send the metrics token as 'Authorization: Bearer <FLOWKEEPER_METRICS_TOKEN>'.",
            )
            response.headers["www-authenticate"] = "Bearer"
            return response
        try:
            text = await self.fk.prometheus_metrics()
        except DatabaseError as exc:
            return error(503, "database_unavailable", str(exc))
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def tick(self, request: Request) -> Response:
        limit = self.fk.max_body_bytes
        try:
            body = await read_body(request, limit)
        except _BodyTooLarge:
            return _too_large(request, limit)
        refusal = self._authorize_tick(request, body)
        if refusal is not None:
            return refusal
        await self.fk.reconcile_once(authoritative=True)
        # On a host with a deadline, stop claiming early enough for the
        # dispatches in flight (each at most the ack timeout) to finish.
        budget = self._budget(request.scope)
        time_limit = None
        if budget is not None:
            ack = self.fk.dispatcher.ack_timeout if self.fk.dispatcher else 0.0
            time_limit = max(1.0, budget - ack - 1.0)
        try:
            with health.driving("http", f"{health.here()} via {request.url.path}"):
                result = await self.fk.tick(time_limit=time_limit)
        except ConfigurationError as exc:
            return error(503, "not_configured", str(exc))
        except DatabaseError as exc:
            return error(503, "database_unavailable", str(exc))
        return JSONResponse(
            {
                "claimed": result.claimed,
                "dispatched": result.dispatched,
                "failed": result.failed,
                "errors": result.errors,
            }
        )

    def _authorize_tick(self, request: Request, body: bytes) -> JSONResponse | None:
        auth = request.headers.get("authorization", "")
        secret = self.fk.cron_secret
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer" and secret:
                if hmac.compare_digest(value.strip().encode(), secret.encode()):
                    return None
                return refuse(
                    request, 401, "invalid_secret", "The bearer token does not match CRON_SECRET."
                )
            if scheme.lower() == "bearer":
                return refuse(
                    request,
                    401,
                    "no_cron_secret",
                    "A bearer token was sent but no CRON_SECRET is configured on this endpoint.",
                )
        try:
            self._verify(request, body, "/tick")
        except SignatureError as exc:
            hint = "" if secret else " (or configure CRON_SECRET and send it as a bearer token)"
            return refuse(request, 401, exc.code, f"{exc}{hint}")
        return None


Create = tuple[str, str, str | None]  # workflow, input JSON, idempotency key

#: The longest idempotency key an invocation may carry (it is indexed with the
#: workflow name, and a btree entry holds at most about 2,700 bytes).
MAX_IDEMPOTENCY_KEY_BYTES = 1000


def _parse_invocation(body: bytes) -> tuple[str, uuid.UUID | None, bool, Create | None]:
    """``{"run_id", "lease", "wait"?, "create"?: {"workflow", "input", "idempotency_key"}}``.

    Raises :class:`InvalidRequestError` saying what is wrong; whatever passes can
    be stored by Postgres as it is.
    """
    import json

    data = parse_json(body)
    if not isinstance(data, dict):
        raise InvalidRequestError("The body must be a JSON object with a run_id.")
    run_id = data.get("run_id")
    try:
        run_id = str(uuid.UUID(run_id)) if isinstance(run_id, str) else None
    except ValueError:
        run_id = None
    if run_id is None:
        raise InvalidRequestError("run_id must be a run's UUID.")
    lease = data.get("lease")
    token: uuid.UUID | None = None
    if lease is not None:
        try:
            token = uuid.UUID(lease) if isinstance(lease, str) else None
        except ValueError:
            token = None
        if token is None:
            raise InvalidRequestError("lease must be a UUID string or null.")
    wait = data.get("wait", False)
    if not isinstance(wait, bool):
        raise InvalidRequestError("wait must be true or false.")
    create: Create | None = None
    if "create" in data:
        spec = data["create"]
        workflow = spec.get("workflow") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(workflow, str) or "input" not in spec:
            raise InvalidRequestError("create needs a workflow name and an input (may be null).")
        try:
            validate_name(check_text(workflow, "create.workflow"))
        except WorkflowError as exc:
            raise InvalidRequestError(f"create.workflow: {exc}") from None
        key = spec.get("idempotency_key")
        if key is not None:
            if not isinstance(key, str):
                raise InvalidRequestError("create.idempotency_key must be a string or null.")
            check_text(key, "create.idempotency_key")
            if len(key.encode()) > MAX_IDEMPOTENCY_KEY_BYTES:
                raise InvalidRequestError(
                    f"create.idempotency_key is longer than {MAX_IDEMPOTENCY_KEY_BYTES} bytes."
                )
        if token is not None:
            raise InvalidRequestError("A create invocation carries no lease.")
        # parse_json checked every string: the input re-serialised is storable.
        create = (workflow, json.dumps(spec["input"], separators=(",", ":")), key)
    return run_id, token, wait, create


def _carried_trace(body: bytes) -> dict[str, str] | None:
    """The trace context a signed invocation carries (flowkeeper.tracing), if any."""
    from .tracing import check_carrier

    try:
        data = json.loads(body)
    except ValueError:
        return None
    return check_carrier(data.get("trace")) if isinstance(data, dict) else None


def _refused(claim: ClaimRefused) -> JSONResponse:
    if claim.reason == "not_found":
        return error(404, "run_not_found", f"No run {claim.run_id} exists.", run_id=claim.run_id)
    messages = {
        "finished": f"The run has already finished ({claim.status}).",
        "leased": "Another invocation holds the run right now.",
        "not_due": "The run is not due yet.",
        "blocked": "The run waits for a concurrency slot; it starts when one frees.",
    }
    return JSONResponse(
        {
            "run_id": claim.run_id,
            "accepted": False,
            "status": claim.status,
            "reason": claim.reason,
            "message": messages.get(claim.reason, claim.reason),
        }
    )


async def _no_route(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods answer in JSON too, like every other refusal."""
    if getattr(exc, "status_code", 404) == 405:
        response = refuse(
            request, 405, "method_not_allowed", f"{request.method} is not allowed here."
        )
        response.headers.update(getattr(exc, "headers", None) or {})
        return response
    return refuse(request, 404, "not_found", "Nothing is served at this path.")


def create_app(
    fk: FlowKeeper, *, time_budget: TimeBudgetHook | None = None, debug: bool = False
) -> Starlette:
    """Build the endpoint app.  No I/O happens until the first request."""
    gcpolicy.raise_threshold(fk.gc_threshold)  # this process serves invocations
    endpoint = Endpoint(fk, time_budget=time_budget)
    routes: list[BaseRoute] = [
        Route("/", endpoint.invoke, methods=["POST"]),
        Route("/", endpoint.health, methods=["GET"]),
        Route("/tick", endpoint.tick, methods=["GET", "POST"]),
        Route("/metrics", endpoint.metrics, methods=["GET"]),
        Route("/tokens/{token}", endpoint.complete_token, methods=["POST"]),
        Route("/runs/{run_id}/stream", endpoint.stream, methods=["GET"]),
        Route("/tokens/{token}", endpoint.token_info, methods=["GET"]),
    ]
    if fk.dashboard_path:  # the dashboard (flowkeeper.dashboard), off with dashboard_path=None
        from .dashboard import create_dashboard

        routes.append(Mount(fk.dashboard_path, app=create_dashboard(fk)))
    middleware = []
    if endpoint.base_path:
        middleware.append(Middleware(PrefixMiddleware, prefix=endpoint.base_path))
    app = Starlette(
        debug=debug,
        routes=routes,
        middleware=middleware,
        exception_handlers={404: _no_route, 405: _no_route},
    )
    app.state.flowkeeper = fk
    return app
