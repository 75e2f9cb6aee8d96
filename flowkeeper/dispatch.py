"""The dispatcher: sends signed invocations to the endpoint over HTTP.

An invocation asks the endpoint to advance one run.  The endpoint answers as
soon as it has claimed the run (202) and goes on with the steps after the
response, so a dispatch costs one short round trip, not the run's duration.
Where a host buffers the response until the run segment ends (Lambda behind a
function URL), the read times out after ``ack_timeout``: the request was
delivered and the lease covers the run, so that counts as delivered too.

The HTTP/1.1 client is aiohttp's (its llhttp parser reads every framing RFC
9112 allows), one keep-alive connection pool per event loop.  It is imported
on the first dispatch, not with flowkeeper.  ``bench/transports.py`` measured
it against httpx (about half the throughput: its pool scans every connection
for every request) and a hand-written client (no faster end to end).
Proxies and redirects are not followed: invocations go to the app's own
endpoint.  A POST that fails on a reused keep-alive connection the server had
closed is sent once more on a new one; invocations are idempotent (a duplicate
is refused by the lease), so that retry is safe.

    HTTPError (a DispatchError)   the request could not be completed
    ├── ConnectError              no connection (refused, unreachable, TLS)
    │   └── ConnectTimeout
    ├── ReadTimeout               sent in full, no answer within ack_timeout
    └── ProtocolError             the answer was cut short, malformed or too large
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import ConfigurationError, DispatchError
from .signing import RequestSigner

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger("flowkeeper")

_MAX_BODY = 1024 * 1024


class HTTPError(DispatchError):
    """An invocation's request could not be completed (connection, protocol)."""


class ConnectError(HTTPError):
    """No connection could be made (refused, unreachable, TLS verification failed)."""


class ConnectTimeout(ConnectError):
    """No connection within ``connect_timeout``."""


class ReadTimeout(HTTPError):
    """The request was sent in full but no answer came within ``ack_timeout``."""


class ProtocolError(HTTPError):
    """The answer was cut short, malformed, or too large."""


@dataclass(frozen=True, slots=True)
class Response:
    status_code: int
    headers: dict[str, str]  # lower-case names
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class HTTPClient:
    """Keep-alive HTTP/1.1 POSTs over aiohttp; bound to the event loop that makes it."""

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        max_connections: int = 64,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self._ssl_context = ssl_context
        trace = aiohttp.TraceConfig()
        trace.on_connection_reuseconn.append(_note_reuse)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=max_connections,
                limit_per_host=0,
            ),
            # sock_read: from the request's sending to the answer's first byte, and
            # between any two reads after it.  The wait for a free connection is not
            # bounded (as many requests as connections are in flight at once).
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=connect_timeout, sock_read=read_timeout
            ),
            trace_configs=[trace],
            skip_auto_headers=("User-Agent",),
        )

    async def post(self, url: str, *, content: bytes, headers: Mapping[str, str]) -> Response:
        aiohttp = self._aiohttp
        parts = urlsplit(url)
        where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        for attempt in range(3):
            state: dict[str, bool] = {"reused": False}
            try:
                async with self._session.post(
                    url,
                    ssl=self._tls() if parts.scheme == "https" else True,
                    data=content,
                    headers=headers,
                    allow_redirects=False,
                    trace_request_ctx=state,
                ) as r:
                    body = bytearray()
                    async for chunk in r.content.iter_any():
                        body += chunk
                        if len(body) > _MAX_BODY:
                            raise ProtocolError(f"the response from {where} is over 1 MiB")
                    fields = {k.lower(): v for k, v in r.headers.items()}
                    return Response(r.status, fields, bytes(body))
            except aiohttp.ConnectionTimeoutError as exc:
                raise ConnectTimeout(f"connecting to {where} timed out") from exc
            except aiohttp.ClientConnectorError as exc:
                raise ConnectError(f"cannot connect to {where}: {exc.os_error}") from exc
            except (aiohttp.SocketTimeoutError, TimeoutError) as exc:
                raise ReadTimeout(f"no answer from {where} within the ack timeout") from exc
            except aiohttp.ClientPayloadError as exc:
                raise ProtocolError(
                    f"{where} closed the connection before the end of the body, or sent a "
                    f"malformed one ({_cause(exc)})"
                ) from exc
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if state["reused"] and attempt < 2:
                    continue  # a kept-alive connection the server had closed
                if isinstance(exc, aiohttp.ServerDisconnectedError):
                    raise ProtocolError(f"{where} closed the connection before answering") from exc
                raise HTTPError(f"the connection to {where} failed: {exc}") from exc
            except aiohttp.ClientResponseError as exc:  # the parser refused the answer
                message = " ".join(str(exc.message).split())
                raise ProtocolError(f"{where} sent a malformed response: {message}") from exc
            except aiohttp.ClientError as exc:
                raise HTTPError(f"request to {where} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _tls(self) -> ssl.SSLContext:
        """Verified against the system's CAs (SSL_CERT_FILE honoured) unless given.

        Made at the first https request, not with the client: reading the CA
        bundle takes about 50 ms, which a plain-http endpoint never needs.
        """
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def aclose(self) -> None:
        await self._session.close()

    def abandon(self) -> None:
        """Drop the pool without I/O (its event loop is gone or elsewhere)."""
        connector = self._session.connector
        self._session.detach()
        if connector is not None:
            with contextlib.suppress(Exception):
                connector._close()  # synchronous: closes the transports


async def _note_reuse(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: object
) -> None:
    state = context.trace_request_ctx
    if isinstance(state, dict):
        state["reused"] = True


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc.__context__
    text = str(inner) if inner is not None else ""
    return " ".join((text or str(exc) or type(exc).__name__).split())


def validate_endpoint(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ConfigurationError(
            f"Invalid endpoint URL {endpoint!r}: give the full URL where the flowkeeper app "
            "is mounted, e.g. https://shop.example/api/flowkeeper (FLOWKEEPER_ENDPOINT)."
        )
    return endpoint.rstrip("/")


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of one invocation."""

    run_id: str
    delivered: bool
    status_code: int | None = None
    reason: str = ""
    body: dict[str, Any] | None = None


class Dispatcher:
    """Signs and posts invocations; one keep-alive HTTP client per event loop."""

    def __init__(
        self,
        endpoint: str,
        signer: RequestSigner,
        *,
        ack_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        max_connections: int = 64,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.endpoint = validate_endpoint(endpoint)
        #: The endpoint's path without a trailing slash ("" at a host's root).
        #: Invocations go to base_path + "/", ticks to base_path + "/tick".
        self.base_path = urlsplit(self.endpoint).path.rstrip("/")
        self.signer = signer
        self.ack_timeout = ack_timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        #: Verifies https endpoints; None: the system's CAs (SSL_CERT_FILE honoured).
        self.ssl_context = ssl_context
        self._client: HTTPClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _http(self) -> HTTPClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            if self._client is not None:
                self._client.abandon()
            self._client = HTTPClient(
                connect_timeout=self.connect_timeout,
                read_timeout=self.ack_timeout,
                max_connections=self.max_connections,
                ssl_context=self.ssl_context,
            )
            self._loop = loop
        return self._client

    def signed(self, route: str, payload: dict[str, Any]) -> tuple[str, bytes, dict[str, str]]:
        """URL, body and headers of a signed POST of ``payload`` to ``route`` ("/", "/tick")."""
        return self.sign_body(route, json.dumps(payload, separators=(",", ":")).encode())

    def sign_body(self, route: str, body: bytes) -> tuple[str, bytes, dict[str, str]]:
        """URL, body and headers of a signed POST of these exact bytes to ``route``."""
        headers = self.signer.sign(method="POST", path=self.base_path + route, body=body)
        headers["Content-Type"] = "application/json"
        return self.endpoint + route, body, headers

    #: Whether :meth:`create` can hand new runs to the endpoint (it needs the
    #: endpoint's answer: an asynchronous transport such as Lambda's Event
    #: invoke cannot say whether the run was created).
    supports_create = True

    async def create(
        self,
        run_id: str,
        workflow: str,
        input_json: str,
        idempotency_key: str | None,
        *,
        trace: dict[str, str] | None = None,
    ) -> Delivery:
        """Hand a new run to the endpoint, which creates and starts it in one write.

        ``delivered`` only when the endpoint answered with the run's id (the
        run exists, perhaps under an earlier run with the same idempotency key,
        whose id ``body["run_id"]`` is then).  Anything else, including no
        answer in time, leaves it to the caller to insert the run itself.
        """
        # The input is JSON text already: embed it without parsing it again.
        # ``trace``: the caller's trace context (flowkeeper.tracing), carried signed.
        carried = f',"trace":{json.dumps(trace)}' if trace else ""
        url, body, headers = self.sign_body(
            "/",
            (
                f'{{"run_id":"{run_id}","lease":null{carried},"create":{{"workflow":'
                f'{json.dumps(workflow)},"idempotency_key":{json.dumps(idempotency_key)},'
                f'"input":{input_json}}}}}'
            ).encode(),
        )
        try:
            response = await self._http().post(url, content=body, headers=headers)
        except HTTPError as exc:
            return Delivery(run_id, False, None, f"{type(exc).__name__}: {exc or 'no detail'}")
        try:
            data = json.loads(response.content) if response.content else None
        except ValueError:
            data = None
        answered = isinstance(data, dict) and isinstance(data.get("run_id"), str)
        code = response.status_code
        if answered and (code in (200, 202) or _error_code(data) == "unknown_workflow"):
            return Delivery(run_id, True, code, "", data)
        return Delivery(run_id, False, code, f"HTTP {code}: {_error_message(data)}", data)

    async def invoke(self, run_id: str, token: str | None, *, wait: bool = False) -> Delivery:
        """Ask the endpoint to advance ``run_id`` under the lease ``token``."""
        payload: dict[str, Any] = {"run_id": run_id, "lease": token}
        if wait:
            payload["wait"] = True
        url, body, headers = self.signed("/", payload)
        try:
            response = await self._http().post(url, content=body, headers=headers)
        except ReadTimeout:
            # Sent in full; the endpoint is working on it (or died: the lease expires).
            return Delivery(run_id, True, None, "no answer within the ack timeout (in flight)")
        except HTTPError as exc:
            return Delivery(run_id, False, None, f"{type(exc).__name__}: {exc or 'no detail'}")
        try:
            data = json.loads(response.content) if response.content else None
        except ValueError:
            data = None
        code = response.status_code
        answered = isinstance(data, dict) and "run_id" in data
        if code in (200, 202) and answered:
            return Delivery(run_id, True, code, "", data)
        if code == 404 and _error_code(data) in ("run_not_found", "unknown_workflow"):
            # Unknown run (rolled-back outbox trigger) or unknown workflow (the run
            # was marked failed by the endpoint): delivered, nothing to retry.
            return Delivery(run_id, True, code, _error_message(data), data)
        if _error_code(data) is not None:
            return Delivery(run_id, False, code, f"HTTP {code}: {_error_message(data)}", data)
        if code >= 500:
            detail = " ".join(response.text.split())[:200] or "empty body"
            return Delivery(run_id, False, code, f"HTTP {code}: {detail}", data)
        # Not flowkeeper's answer (a 404 page, another app, a login wall): retried
        # like any failure, with a reason that says where to look.
        reason = (
            f"HTTP {code} from {self.endpoint}/, which does not answer as a flowkeeper "
            "endpoint (check FLOWKEEPER_ENDPOINT and where fk.asgi() is mounted)"
        )
        return Delivery(run_id, False, code, reason, data)

    async def aclose(self) -> None:
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop
                await client.aclose()


def _error_code(data: Any) -> str | None:
    """The endpoint's error code, or None when the body is not flowkeeper's."""
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            return str(err["code"])
    return None


def _error_message(data: Any) -> str:
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err.get("code") or err)
        if err:
            return str(err)
    return "no JSON error body"
