"""The dispatcher: sends signed invocations to the endpoint over HTTP.

An invocation asks the endpoint to advance one run.  The endpoint answers as
soon as it has claimed the run (202) and goes on with the steps after the
response, so a dispatch costs one short round trip, not the run's duration.
Where a host buffers the response until the run segment ends (Lambda behind a
function URL), the read times out after ``ack_timeout``: the request was
delivered and the lease covers the run, so that counts as delivered too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from . import http11
from .errors import ConfigurationError
from .signing import RequestSigner

logger = logging.getLogger("flowkeeper")


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
    ) -> None:
        self.endpoint = validate_endpoint(endpoint)
        #: The endpoint's path without a trailing slash ("" at a host's root).
        #: Invocations go to base_path + "/", ticks to base_path + "/tick".
        self.base_path = urlsplit(self.endpoint).path.rstrip("/")
        self.signer = signer
        self.ack_timeout = ack_timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._client: http11.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _http(self) -> http11.Client:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = http11.Client(
                connect_timeout=self.connect_timeout,
                read_timeout=self.ack_timeout,
                max_connections=self.max_connections,
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
        self, run_id: str, workflow: str, input_json: str, idempotency_key: str | None
    ) -> Delivery:
        """Hand a new run to the endpoint, which creates and starts it in one write.

        ``delivered`` only when the endpoint answered with the run's id (the
        run exists, perhaps under an earlier run with the same idempotency key,
        whose id ``body["run_id"]`` is then).  Anything else, including no
        answer in time, leaves it to the caller to insert the run itself.
        """
        # The input is JSON text already: embed it without parsing it again.
        url, body, headers = self.sign_body(
            "/",
            (
                f'{{"run_id":"{run_id}","lease":null,"create":{{"workflow":{json.dumps(workflow)},'
                f'"idempotency_key":{json.dumps(idempotency_key)},"input":{input_json}}}}}'
            ).encode(),
        )
        try:
            response = await self._http().post(url, content=body, headers=headers)
        except http11.HTTPError as exc:
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
        except http11.ReadTimeout:
            # Sent in full; the endpoint is working on it (or died: the lease expires).
            return Delivery(run_id, True, None, "no answer within the ack timeout (in flight)")
        except http11.HTTPError as exc:
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
