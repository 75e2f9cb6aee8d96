"""The dashboard's pages, its JSON API and its actions.

Mounted by the endpoint under ``dashboard_path`` (``/ui``): ``/`` the runs
list, ``/runs/<id>`` a run, ``/events`` the events sent, ``/events/<number>``
one event and the runs it woke, started or cancelled, ``/schedules`` the cron
schedules, concurrency-key usage and the schema's size, ``/login`` and
``/logout``, ``/api/...`` the JSON
the pages poll, ``/static/...`` the CSS and JavaScript shipped in the package.
Pages and API need a session; actions (POST) need its CSRF token too.  Live
updates are short polling, not server-sent events: serverless hosts buffer or
cut long responses, and a poll of an unchanged run costs one indexed lookup
(``ETag``/``304``).
"""

from __future__ import annotations

import functools
import hashlib
import html
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..boundary import check_text, parse_json
from ..errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseRefusedError,
    EventNotFoundError,
    InvalidRequestError,
    RunNotFoundError,
    RunStateError,
    ScheduleNotFoundError,
)
from ..eventlist import EventFilter, parse_event_number
from ..flowcontrol import FlowStatus
from ..ids import check_run_id
from ..runlist import RunFilter
from .auth import Auth, Session, same_origin
from .views import (
    event_json,
    events_json,
    page_json,
    render,
    run_json,
    schedules_json,
    script_json,
)

if TYPE_CHECKING:
    from ..client import FlowKeeper

logger = logging.getLogger("flowkeeper")

_STATIC = resources.files(__package__).joinpath("static")
_MAX_ACTION_BODY = 16 * 1024

# No inline script or style anywhere: the pages load only their own files.
_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


@functools.lru_cache(maxsize=1)
def asset_version() -> str:
    """Changes whenever the shipped CSS or JavaScript does (cache busting)."""
    digest = hashlib.sha256()
    for name in ("app.css", "app.js"):
        digest.update(_STATIC.joinpath(name).read_bytes())
    return digest.hexdigest()[:12]


def _security_headers(app: ASGIApp) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k for k, _ in headers}
                headers += [(k, v) for k, v in _SECURITY_HEADERS if k not in names]
                if not scope["path"].rstrip("/").endswith(("/static", ".css", ".js")):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_with_headers)

    return wrapped


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _warn(request: Request, status: int, code: str, message: str) -> None:
    """One WARNING line for a refused request: who, what, why."""
    client = request.client.host if request.client else "unknown"
    logger.warning(
        "dashboard refused %s %s from %s: %d %s: %s",
        request.method,
        request.scope.get("path", ""),
        client,
        status,
        code,
        message,
    )


def _refuse(request: Request, status: int, code: str, message: str) -> JSONResponse:
    _warn(request, status, code, message)
    return _error(status, code, message)


Handler = Callable[[Request], Awaitable[Response]]


class Dashboard:
    """Request handlers bound to one FlowKeeper."""

    def __init__(self, fk: FlowKeeper) -> None:
        self.fk = fk
        self.auth = Auth(fk)

    @staticmethod
    def base(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    # guards ------------------------------------------------------------------------
    def _off(self, request: Request, api: bool) -> Response:
        message = (
            "The flowkeeper dashboard is off: no password is configured. Set "
            "FLOWKEEPER_DASHBOARD_PASSWORD (or FlowKeeper(dashboard_password=...)) to turn it on."
        )
        if api:
            return _error(403, "dashboard_off", message)
        body = render("off.html", base=self.base(request), version=asset_version())
        return HTMLResponse(body, status_code=403)

    def page(self, handler: Callable[[Request, Session], Awaitable[Response]]) -> Handler:
        """An HTML page: without a session, off to the login page (and back after)."""

        async def guarded(request: Request) -> Response:
            if not self.auth.enabled:
                return self._off(request, api=False)
            session = await self.auth.session(request)
            if session is None:
                query = request.scope.get("query_string", b"").decode("latin-1")
                target = request.scope["path"] + (f"?{query}" if query else "")
                return RedirectResponse(
                    f"{self.base(request)}/login?next={quote(target, safe='')}", status_code=303
                )
            try:
                return await handler(request, session)
            except DatabaseRefusedError as exc:
                return HTMLResponse(
                    f"<h1>Refused</h1><p>{html.escape(str(exc))}</p>", status_code=400
                )
            except DatabaseError as exc:
                return HTMLResponse(
                    f"<h1>Database unavailable</h1><p>{html.escape(str(exc))}</p>", status_code=503
                )

        return guarded

    def api(
        self,
        handler: Callable[[Request, Session], Awaitable[Response]],
        *,
        action: bool = False,
    ) -> Handler:
        """JSON: needs a session; an action (POST) also needs its CSRF token."""

        async def guarded(request: Request) -> Response:
            if not self.auth.enabled:
                return self._off(request, api=True)
            session = await self.auth.session(request)
            if session is None:
                return _error(401, "not_signed_in", "Sign in to the dashboard first.")
            if action:
                if not same_origin(request):
                    return _refuse(request, 403, "cross_origin", "Cross-site requests are refused.")
                if not self.auth.csrf_ok(session, request):
                    return _refuse(
                        request,
                        403,
                        "csrf",
                        "Missing or wrong CSRF token (X-CSRF-Token). Reload the page and retry.",
                    )
            try:
                return await handler(request, session)
            except (ConfigurationError, InvalidRequestError, DatabaseRefusedError) as exc:
                return _refuse(request, 400, "invalid", str(exc))
            except RunNotFoundError as exc:
                return _error(404, "run_not_found", str(exc))
            except EventNotFoundError as exc:
                return _error(404, "event_not_found", str(exc))
            except RunStateError as exc:
                return _error(409, "conflict", str(exc))
            except DatabaseError as exc:
                return _error(503, "database_unavailable", str(exc))

        return guarded

    # sign in ------------------------------------------------------------------------
    def _login_page(self, request: Request, message: str = "", status: int = 200) -> Response:
        base = self.base(request)
        next_url = _safe_next(request.query_params.get("next", ""), base)
        note = f'<p class="error" id="login-error">{html.escape(message)}</p>' if message else ""
        body = render(
            "login.html", base=base, version=asset_version(), next=next_url, message_html=note
        )
        return HTMLResponse(body, status_code=status)

    async def login_form(self, request: Request) -> Response:
        if not self.auth.enabled:
            return self._off(request, api=False)
        return self._login_page(request)

    async def login(self, request: Request) -> Response:
        if not self.auth.enabled:
            return self._off(request, api=False)
        base = self.base(request)
        if not same_origin(request):
            return self._login_page(request, "Cross-site sign-in refused.", 403)
        if not await self.auth.attempt(request):
            return self._login_page(
                request,
                "Too many failed sign-ins from your address. Wait 15 minutes and try again.",
                429,
            )
        form = await _form(request)
        password = form.get("password")
        next_url = _safe_next(str(form.get("next") or ""), base)
        if not isinstance(password, str) or not self.auth.password_matches(password):
            await self.auth.failed(request)
            logger.warning("dashboard: failed sign-in from %s", request.client)
            return self._login_page(request, "Wrong password.", 401)
        await self.auth.succeeded(request)
        response = RedirectResponse(next_url, status_code=303)
        await self.auth.start(request, response, base)
        return response

    async def logout(self, request: Request) -> Response:
        if not self.auth.enabled:
            return self._off(request, api=False)
        base = self.base(request)
        session = await self.auth.session(request)
        form = await _form(request)
        if session is not None and (
            not same_origin(request) or not self.auth.csrf_ok(session, request, form)
        ):
            return _refuse(request, 403, "csrf", "Missing or wrong CSRF token.")
        response = RedirectResponse(f"{base}/login", status_code=303)
        await self.auth.end(request, response, base)
        return response

    # pages --------------------------------------------------------------------------
    def _shell(self, request: Request, session: Session, page: str, title: str, data: Any) -> str:
        return render(
            "page.html",
            base=self.base(request),
            csrf=session.csrf,
            version=asset_version(),
            page=page,
            title=title,
            data_json=script_json(data),
        )

    async def runs_page(self, request: Request, session: Session) -> Response:
        status = 200
        try:
            data = await self._runs_data(request)
        except (ConfigurationError, InvalidRequestError) as exc:
            # The page, with the filter's problem on it (and the status saying so).
            status = 400
            _warn(request, status, "invalid", str(exc))
            data = {"error": str(exc), "runs": [], "counts": {}, "workflows": [], "query": {}}
        return HTMLResponse(self._shell(request, session, "runs", "Runs", data), status_code=status)

    async def run_page(self, request: Request, session: Session) -> Response:
        run_id = request.path_params["run_id"]
        try:
            run_id = check_run_id(run_id)
            data = await self._run_data(run_id)
        except RunNotFoundError as exc:
            data = {"missing": str(exc), "id": run_id}
            body = self._shell(request, session, "run", "Run not found", data)
            return HTMLResponse(body, status_code=404)
        title = f"{data['workflow']} {run_id[:8]}… {data['status']}"
        return HTMLResponse(self._shell(request, session, "run", title, data))

    async def events_page(self, request: Request, session: Session) -> Response:
        status = 200
        try:
            data = await self._events_data(request)
        except (ConfigurationError, InvalidRequestError) as exc:
            status = 400
            _warn(request, status, "invalid", str(exc))
            data = {"error": str(exc), "events": [], "next_before": None, "query": {}}
        body = self._shell(request, session, "events", "Events", data)
        return HTMLResponse(body, status_code=status)

    async def event_page(self, request: Request, session: Session) -> Response:
        raw = request.path_params["number"]
        try:
            data = event_json(await self.fk.require_event(parse_event_number(raw)))
        except ConfigurationError as exc:
            _warn(request, 400, "invalid", str(exc))
            body = self._shell(request, session, "event", "Bad event number", {"missing": str(exc)})
            return HTMLResponse(body, status_code=400)
        except EventNotFoundError as exc:
            body = self._shell(request, session, "event", "Event not found", {"missing": str(exc)})
            return HTMLResponse(body, status_code=404)
        title = f"Event {data['number']} {data['name']}"
        return HTMLResponse(self._shell(request, session, "event", title, data))

    # API ------------------------------------------------------------------------------
    async def _events_data(self, request: Request) -> dict[str, Any]:
        q = request.query_params
        f = EventFilter.build(
            name=q.get("name"), event_id=q.get("id"), before=q.get("before"), limit=q.get("limit")
        )
        return events_json(await self.fk.event_page(f))

    async def api_events(self, request: Request, session: Session) -> Response:
        return JSONResponse(await self._events_data(request))

    async def api_event(self, request: Request, session: Session) -> Response:
        number = parse_event_number(request.path_params["number"])
        return JSONResponse(event_json(await self.fk.require_event(number)))

    async def _runs_data(self, request: Request) -> dict[str, Any]:
        q = request.query_params
        f = RunFilter.build(
            workflow=q.get("workflow"),
            status=q.get("status"),
            since=q.get("since"),
            until=q.get("until"),
            search=q.get("q"),
            before=q.get("before"),
            limit=q.get("limit"),
        )
        page = await self.fk.list_runs(f)
        workflows = await self.fk.list_workflows()
        data = page_json(page, workflows, f.as_query())
        data["health"] = (await self.fk.health()).as_json()
        return data

    async def _run_data(self, run_id: str, version: str | None = None) -> dict[str, Any]:
        """The run page's data.  ``version`` (the ETag) is read before the data, never
        after: a change between the reads then makes the next poll fetch again, where
        a version newer than the data would have answered it 304 for good."""
        if version is None:
            version = await self._version(run_id)
        info = await self.fk.get_run(run_id)
        now = await self.fk.store.clock_now()
        waits = await self.fk.run_waits(run_id)
        children = await self.fk.store.run_children(run_id, 200)
        total = len(children)
        if total == 200:
            total = await self.fk.store.count_children(run_id)
        data = run_json(
            info,
            now,
            version,
            waits,
            await self.fk.run_logs(run_id),
            parent=await self.fk.store.run_parent(run_id),
            children=children,
            children_total=total,
        )
        # Why a queued run has not started (flowkeeper.flowcontrol).
        queued = info.status.value == "queued"
        reason = await FlowStatus(self.fk.store).queued_reason(run_id) if queued else None
        data["queued_reason"] = reason.text if reason is not None else None
        return data

    async def _version(self, run_id: str) -> str | None:
        """The run's version, and its logs' (stored just after the step they belong to)."""
        version = await self.fk.run_version(run_id)
        if version is None:
            return None
        return f"{version}.{await self.fk.store.step_logs_version(run_id)}"

    async def api_runs(self, request: Request, session: Session) -> Response:
        return JSONResponse(await self._runs_data(request))

    async def api_patches(self, request: Request, session: Session) -> Response:
        """Live runs per branch of each ctx.patched id (loaded once by the runs page)."""
        branches = await self.fk.patch_branches()
        return JSONResponse({"patches": [b.as_json() for b in branches]})

    async def api_run(self, request: Request, session: Session) -> Response:
        run_id = check_run_id(request.path_params["run_id"])
        version = await self._version(run_id)
        if version is None:
            raise RunNotFoundError(run_id)
        etag = f'"{version}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"etag": etag})
        data = await self._run_data(run_id, version)
        return JSONResponse(data, headers={"etag": etag})

    async def api_stream(self, request: Request, session: Session) -> Response:
        """The run's stream after a cursor (the run page polls it while the run is live)."""
        run_id = check_run_id(request.path_params["run_id"])
        raw = request.query_params.get("after", "0")
        if not raw.isdigit() or len(raw) > 18:
            raise InvalidRequestError("after must be a stream cursor (a whole number).")
        messages, finished = await self.fk.read_stream(run_id, after=int(raw), limit=200)
        return JSONResponse(
            {
                "messages": [m.as_json() for m in messages],
                "cursor": messages[-1].cursor if messages else int(raw),
                "finished": finished,
            }
        )

    async def api_action(self, request: Request, session: Session) -> Response:
        run_id = check_run_id(request.path_params["run_id"])
        action = request.path_params["action"]
        body = await _json_body(request)
        reason = _text(body.get("reason"), "reason")
        if action == "replay":
            step = _text(body.get("from_step"), "from_step")
            await self.fk.replay(run_id, from_step=step, reason=reason, actor="dashboard")
            where = f"step {step!r}" if step else "where it stopped"
            message = f"Replaying from {where}."
        elif action == "fork":
            step = _text(body.get("from_step"), "from_step")
            handle = await self.fk.fork(run_id, from_step=step, reason=reason, actor="dashboard")
            where = f"step {step!r}" if step else "where it stopped"
            logger.info("dashboard: fork of run %s into %s", run_id, handle.run_id)
            return JSONResponse(
                {
                    "ok": True,
                    "message": f"Forked from {where} into run {handle.run_id}.",
                    "run_id": handle.run_id,
                    "forked_from": run_id,
                }
            )
        elif action == "retry":
            retried = await self.fk.retry(run_id, reason=reason, actor="dashboard")
            message = "Retrying now." if retried else "Its retry is being dispatched already."
        elif action == "cancel":
            cancelled = await self.fk.cancel(
                run_id, reason=reason or "cancelled from the dashboard"
            )
            if not cancelled:
                raise RunStateError(run_id, None, f"Run {run_id} had already finished.")
            message = "Cancelled."
        else:
            return _refuse(
                request,
                404,
                "unknown_action",
                f"No action {action!r}: replay, fork, retry, cancel.",
            )
        logger.info("dashboard: %s of run %s", action, run_id)
        return JSONResponse({"ok": True, "message": message, "run_id": run_id})

    # schedules, concurrency keys, storage (flowkeeper.schedules, flowkeeper.flowcontrol) ------
    async def _schedules_data(self) -> dict[str, Any]:
        status = FlowStatus(self.fk.store)
        return schedules_json(
            await self.fk.schedules.list(),
            await status.key_usage(50),
            await status.schema_usage(),
            self.fk.schema,
        )

    async def schedules_page(self, request: Request, session: Session) -> Response:
        data = await self._schedules_data()
        return HTMLResponse(self._shell(request, session, "schedules", "Schedules", data))

    async def api_schedules(self, request: Request, session: Session) -> Response:
        return JSONResponse(await self._schedules_data())

    async def api_schedule_action(self, request: Request, session: Session) -> Response:
        workflow = request.path_params["workflow"]
        action = request.path_params["action"]
        try:
            if action == "pause":
                await self.fk.schedules.pause(workflow)
                message = f"Paused {workflow}."
            elif action == "resume":
                following = await self.fk.schedules.resume(workflow)
                message = f"Resumed {workflow}; next slot {following.isoformat()}."
            elif action == "run-now":
                run_id = await self.fk.schedules.run_now(workflow)
                message = f"Started run {run_id}."
            else:
                return _refuse(
                    request, 404, "unknown_action", f"No action {action!r}: pause, resume, run-now."
                )
        except ScheduleNotFoundError as exc:
            return _error(404, "schedule_not_found", str(exc))
        logger.info("dashboard: %s of schedule %s", action, workflow)
        return JSONResponse({"ok": True, "message": message})

    async def api_replay_failed(self, request: Request, session: Session) -> Response:
        body = await _json_body(request)
        workflow = _text(body.get("workflow"), "workflow")
        if not workflow:
            raise ConfigurationError("Say which workflow's failed runs to replay (workflow).")
        ids = await self.fk.replay_failed(
            workflow, reason=_text(body.get("reason"), "reason"), actor="dashboard"
        )
        noun = "run" if len(ids) == 1 else "runs"
        return JSONResponse(
            {"ok": True, "replayed": ids, "message": f"Replaying {len(ids)} failed {noun}."}
        )


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > _MAX_ACTION_BODY:
        raise InvalidRequestError(
            f"The request body is larger than the limit of {_MAX_ACTION_BODY} bytes."
        )
    if not raw.strip():
        return {}
    data = parse_json(raw, what="The request body")
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    return data


async def _form(request: Request) -> dict[str, str]:
    """A small urlencoded form (sign-in, sign-out), without a multipart parser."""
    raw = await request.body()
    if len(raw) > _MAX_ACTION_BODY:
        return {}
    pairs = parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
    return dict(pairs)


def _text(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 500:
        raise InvalidRequestError(f"{name} must be a string of at most 500 characters.")
    return check_text(value, name)


def _safe_next(target: str, base: str) -> str:
    """Only a path inside the dashboard: never an open redirect elsewhere."""
    home = f"{base}/"
    if not target.startswith(home) or "//" in target or "\\" in target or "\n" in target:
        return home
    return target


def create_dashboard(fk: FlowKeeper) -> ASGIApp:
    """The dashboard app; the endpoint mounts it at ``fk.dashboard_path``."""
    d = Dashboard(fk)
    routes = [
        Route("/", d.page(d.runs_page), methods=["GET"]),
        Route("/runs/{run_id}", d.page(d.run_page), methods=["GET"]),
        Route("/events", d.page(d.events_page), methods=["GET"]),
        Route("/schedules", d.page(d.schedules_page), methods=["GET"]),
        Route("/events/{number}", d.page(d.event_page), methods=["GET"]),
        Route("/login", d.login_form, methods=["GET"]),
        Route("/login", d.login, methods=["POST"]),
        Route("/logout", d.logout, methods=["POST"]),
        Route("/api/runs", d.api(d.api_runs), methods=["GET"]),
        Route("/api/patches", d.api(d.api_patches), methods=["GET"]),
        Route("/api/runs/{run_id}", d.api(d.api_run), methods=["GET"]),
        Route("/api/events", d.api(d.api_events), methods=["GET"]),
        Route("/api/schedules", d.api(d.api_schedules), methods=["GET"]),
        Route(
            "/api/schedules/{workflow}/{action}",
            d.api(d.api_schedule_action, action=True),
            methods=["POST"],
        ),
        Route("/api/events/{number}", d.api(d.api_event), methods=["GET"]),
        Route("/api/runs/{run_id}/stream", d.api(d.api_stream), methods=["GET"]),
        Route("/api/runs/{run_id}/{action}", d.api(d.api_action, action=True), methods=["POST"]),
        Route("/api/replay-failed", d.api(d.api_replay_failed, action=True), methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(_STATIC))),
    ]
    return _security_headers(
        Starlette(routes=routes, exception_handlers={404: _no_route, 405: _no_route})
    )


async def _no_route(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods answer in JSON too, like every other refusal."""
    status = getattr(exc, "status_code", 404)
    if status == 405:
        response = _refuse(
            request, 405, "method_not_allowed", f"{request.method} is not allowed here."
        )
        response.headers.update(getattr(exc, "headers", None) or {})
        return response
    return _refuse(request, 404, "not_found", "Nothing is served at this path.")
