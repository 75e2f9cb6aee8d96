"""A dispatcher that invokes the Lambda function itself instead of posting HTTP.

Inside Lambda the function's own URL is often unknown when it is configured
(a function URL's address exists only after the deploy, and the function
cannot reference it without a circular dependency).  The function always
knows its own name, though, so runs are pushed with an asynchronous Invoke
(``InvocationType="Event"``) carrying the same signed request an HTTP
dispatcher would post.  Lambda queues the event and starts another instance;
the caller does not wait for the run's segment.

boto3 ships with Lambda's Python runtimes, so nothing extra is installed;
tests pass their own ``client``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from flowkeeper.dispatch import Delivery, Dispatcher
from flowkeeper.errors import ConfigurationError
from flowkeeper.signing import RequestSigner

from .events import advance_event

logger = logging.getLogger("flowkeeper")


class InvokeClient(Protocol):
    """The part of boto3's Lambda client this dispatcher uses."""

    def invoke(self, **kwargs: Any) -> dict[str, Any]: ...


class LambdaInvokeDispatcher(Dispatcher):
    """Pushes invocations with Lambda's Invoke API (asynchronous, signed envelope)."""

    #: An Event invoke returns before the run is created: trigger() inserts runs itself.
    supports_create = False

    def __init__(
        self,
        function_name: str,
        signer: RequestSigner,
        *,
        base_path: str = "/api/flowkeeper",
        client: InvokeClient | None = None,
        qualifier: str | None = None,
    ) -> None:
        if not function_name:
            raise ConfigurationError(
                "Self-invocation needs the function's name: it is read from "
                "AWS_LAMBDA_FUNCTION_NAME inside Lambda, or pass function_name=..."
            )
        # Not Dispatcher.__init__: there is no URL to validate, only a function name.
        self.endpoint = f"lambda:{function_name}" + (f":{qualifier}" if qualifier else "")
        self.base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        self.signer = signer
        self.function_name = function_name
        self.qualifier = qualifier
        self.ack_timeout = 10.0
        self.connect_timeout = 5.0
        self.max_connections = 0
        self._client = None
        self._loop = None
        #: The Lambda client (boto3's by default, made on first use).
        self.lambda_client: InvokeClient | None = client

    def _client_for_invoke(self) -> InvokeClient:
        if self.lambda_client is None:
            import boto3  # type: ignore[import-not-found, import-untyped, unused-ignore]  # in Lambda's runtime

            self.lambda_client = boto3.client("lambda")
        return self.lambda_client

    async def invoke(self, run_id: str, token: str | None, *, wait: bool = False) -> Delivery:
        """Start an asynchronous invocation that advances ``run_id`` under ``token``."""
        payload: dict[str, Any] = {"run_id": run_id, "lease": token}
        _, body, headers = self.signed("/", payload)
        event = advance_event(body, headers)
        import json

        kwargs: dict[str, Any] = {
            "FunctionName": self.function_name,
            "InvocationType": "RequestResponse" if wait else "Event",
            "Payload": json.dumps(event).encode(),
        }
        if self.qualifier:
            kwargs["Qualifier"] = self.qualifier
        try:
            response = await asyncio.to_thread(self._client_for_invoke().invoke, **kwargs)
        except Exception as exc:  # botocore raises many kinds: throttling, access, network
            return Delivery(run_id, False, None, f"{type(exc).__name__}: {exc}")
        status = int(response.get("StatusCode", 0))
        if status in (200, 202) and not response.get("FunctionError"):
            return Delivery(run_id, True, status)
        return Delivery(
            run_id,
            False,
            status or None,
            f"Lambda Invoke answered {status} {response.get('FunctionError') or ''}".strip(),
        )

    async def aclose(self) -> None:
        """Nothing to close: boto3 clients hold no per-loop state."""
