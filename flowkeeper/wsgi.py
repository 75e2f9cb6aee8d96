"""The endpoint in WSGI apps (Flask, Django), through a2wsgi's ASGI-to-WSGI bridge.

- :func:`wsgi_app` is ``fk.asgi()`` as a WSGI application (a2wsgi runs the
  ASGI app on an event loop thread of its own);
- :func:`mount` routes a path prefix of any WSGI app to it (Flask:
  ``app.wsgi_app = mount(app.wsgi_app, "/api/flowkeeper", wsgi_app(fk))``);
- :func:`django_view` is a Django view for ``urls.py``
  (``re_path(r"^api/flowkeeper/", django_view(fk))``), so the endpoint also
  answers Django's test client and ``LiveServerTestCase``.

Needs ``pip install 'flowkeeper[wsgi]'``.  A WSGI server holds a thread per
request: size it for the invocations in flight (the scheduler's
``--concurrency``), or serve the endpoint beside the app with an ASGI server.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .client import FlowKeeper

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def wsgi_app(fk: FlowKeeper, **options: Any) -> WSGIApp:
    """``fk.asgi(**options)`` wrapped for WSGI servers (a2wsgi)."""
    try:
        from a2wsgi import ASGIMiddleware
    except ImportError:
        raise ConfigurationError(
            "Serving the endpoint from a WSGI app needs a2wsgi: pip install 'flowkeeper[wsgi]'."
        ) from None
    asgi: Any = fk.asgi(**options)
    app: Any = ASGIMiddleware(asgi)
    return cast(WSGIApp, app)


def mount(app: WSGIApp, prefix: str, endpoint: WSGIApp) -> WSGIApp:
    """A WSGI app sending requests under ``prefix`` to ``endpoint``, the rest to ``app``."""
    prefix = "/" + prefix.strip("/")

    def dispatch(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        if path == prefix or path.startswith(prefix + "/"):
            environ = dict(environ)
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix
            environ["PATH_INFO"] = path[len(prefix) :]
            return endpoint(environ, start_response)
        return app(environ, start_response)

    return dispatch


def django_view(fk: FlowKeeper, **options: Any) -> Callable[..., Any]:
    """A Django view serving the endpoint under the prefix its URL pattern matched."""
    from django.http import HttpResponse, StreamingHttpResponse

    endpoint = wsgi_app(fk, **options)

    def view(request: Any, *args: Any, **kwargs: Any) -> Any:
        # The part of the path after the matched prefix is the endpoint's own path.
        matched = request.resolver_match.route if request.resolver_match else ""
        path = request.path_info
        prefix = _prefix(path, matched)
        environ = dict(request.environ)
        environ["SCRIPT_NAME"] = request.META.get("SCRIPT_NAME", "") + prefix
        environ["PATH_INFO"] = path[len(prefix) :] or "/"
        environ["wsgi.input"] = io.BytesIO(request.body)
        environ["CONTENT_LENGTH"] = str(len(request.body))
        started: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc: Any = None) -> Any:
            started["status"], started["headers"] = status, headers
            return lambda data: None

        body = endpoint(environ, start_response)
        iterator = iter(body)
        first = next(iterator, b"")  # start_response is called by now
        status = int(started["status"].split(" ", 1)[0])
        headers = started["headers"]
        streaming = any(
            k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers
        )
        if streaming:

            def chunks() -> Iterable[bytes]:
                yield first
                yield from iterator

            response: Any = StreamingHttpResponse(chunks(), status=status)
        else:
            response = HttpResponse(first + b"".join(iterator), status=status)
            close = getattr(body, "close", None)
            if close is not None:
                close()
        for key, value in headers:
            if key.lower() == "set-cookie":
                response.cookies.load(value)  # several may come; a header would keep one
            elif key.lower() != "content-length":
                response[key] = value
        return response

    # Invocations are signed, dashboard actions carry flowkeeper's own CSRF token.
    view.csrf_exempt = True  # type: ignore[attr-defined]
    return view


def _prefix(path: str, route: str) -> str:
    """The mount prefix of ``path``: the literal start of the route (``api/flowkeeper/``)."""
    literal = route.lstrip("^").split("(", 1)[0].split("<", 1)[0].rstrip("$")
    literal = "/" + literal.strip("/")
    return literal if path.startswith(literal) else ""
