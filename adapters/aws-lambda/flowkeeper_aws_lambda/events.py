"""What kind of Lambda event arrived, and the flowkeeper envelope for direct invocations.

Routing, in order:

* ``{"flowkeeper": {...}}`` — a direct invocation (Lambda Invoke API, an
  EventBridge Scheduler target ``Input``, ``aws_lambda.invoke`` from RDS):
  ``{"action": "tick"}`` runs a scheduler tick; ``{"action": "advance",
  "body": ..., "signature": ...}`` advances one run.
* ``requestContext`` present — an HTTP event (API Gateway REST v1, HTTP API
  v1/v2, function URL, ALB), served through mangum.
* ``source == "aws.events"`` — an EventBridge rule's scheduled event: a tick.

An advance envelope carries exactly the signed request an HTTP dispatcher
would send: ``body`` is the JSON text ``{"run_id": ..., "lease": ...}`` and
``signature`` the ``Flowkeeper-Signature`` value for ``POST <endpoint
path>/`` over those bytes (see :mod:`flowkeeper.signing`).  The same bytes
are valid over HTTP and over Invoke, so any dispatcher (Python, SQL) that
can sign an HTTP invocation can invoke the function directly too.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from flowkeeper.errors import ConfigurationError
from flowkeeper.signing import SIGNATURE_HEADER

ENVELOPE_KEY = "flowkeeper"
TICK_EVENT: dict[str, Any] = {ENVELOPE_KEY: {"action": "tick"}}

EventKind = Literal["http", "tick", "advance"]


@dataclass(frozen=True, slots=True)
class AdvanceRequest:
    """A signed advance envelope: the body bytes and their signature."""

    body: bytes
    signature: str


def infer(event: Any) -> EventKind:
    """Classify a Lambda event; raise ConfigurationError for one we do not serve."""
    if isinstance(event, dict):
        envelope = event.get(ENVELOPE_KEY)
        if envelope is not None:
            action = envelope.get("action") if isinstance(envelope, dict) else None
            if action in ("tick", "advance"):
                return "tick" if action == "tick" else "advance"
            raise ConfigurationError(
                f'Unknown flowkeeper action {action!r} in the event: send {{"flowkeeper": '
                '{"action": "tick"}} to run a tick, or a signed advance envelope made with '
                "flowkeeper_aws_lambda.advance_event()."
            )
        if "requestContext" in event:
            return "http"
        if event.get("source") == "aws.events":
            return "tick"
    keys = sorted(event)[:8] if isinstance(event, dict) else type(event).__name__
    raise ConfigurationError(
        f"This Lambda function received an event flowkeeper does not handle (keys: {keys}). "
        "It serves HTTP events (function URL, API Gateway, ALB), EventBridge scheduled "
        'events, and direct invocations {"flowkeeper": {"action": "tick"}}. For an '
        'EventBridge Scheduler target, set its Input to {"flowkeeper": {"action": "tick"}}.'
    )


def parse_advance(event: dict[str, Any]) -> AdvanceRequest:
    """The body and signature of an advance envelope (checked for shape only)."""
    envelope = event[ENVELOPE_KEY]
    body = envelope.get("body")
    signature = envelope.get("signature")
    if not isinstance(body, str) or not isinstance(signature, str) or not signature:
        raise ConfigurationError(
            'An advance envelope needs "body" (the JSON text of the invocation) and '
            '"signature" (its Flowkeeper-Signature value); make one with '
            "flowkeeper_aws_lambda.advance_event()."
        )
    return AdvanceRequest(body=body.encode(), signature=signature)


def advance_event(body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """The direct-invocation event carrying a signed invocation (body + its headers)."""
    signature = headers.get(SIGNATURE_HEADER)
    if not signature:
        raise ConfigurationError(f"advance_event needs the {SIGNATURE_HEADER} header value")
    return {
        ENVELOPE_KEY: {
            "action": "advance",
            "body": body.decode(),
            "signature": signature,
        }
    }


def decode_invocation(body: bytes) -> tuple[str, str | None]:
    """run_id and lease from the signed body; ConfigurationError when malformed."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    run_id = data.get("run_id") if isinstance(data, dict) else None
    lease = data.get("lease") if isinstance(data, dict) else None
    try:
        if not isinstance(run_id, str) or not (lease is None or isinstance(lease, str)):
            raise ValueError
        return str(uuid.UUID(run_id)), str(uuid.UUID(lease)) if lease is not None else None
    except ValueError:
        raise ConfigurationError(
            'The advance body must be JSON {"run_id": "<uuid>", "lease": "<uuid>" | null}.'
        ) from None
