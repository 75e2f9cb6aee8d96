"""Lambda events in the shapes AWS sends them (see PLATFORMS.md §2 for the sources).

Each builder takes an HTTP request (method, path, headers, body) and returns
the event the service would hand the function for it.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

ACCOUNT = "123456789012"
REGION = "eu-west-1"


def _body(body: bytes) -> tuple[str, bool]:
    try:
        return body.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(body).decode(), True


def _split(path: str) -> tuple[str, str]:
    raw_path, _, query = path.partition("?")
    return raw_path, query


def _query(query: str) -> dict[str, str] | None:
    if not query:
        return None
    return dict(part.split("=", 1) if "=" in part else (part, "") for part in query.split("&"))


def function_url(method: str, path: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """A Lambda function URL request (payload format 2.0, routeKey $default)."""
    raw_path, query = _split(path)
    text, b64 = _body(body)
    url_id = "abcdefghijklmnopqrstuvwxyz012345"
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": raw_path,
        "rawQueryString": query,
        "headers": {
            **{k.lower(): v for k, v in headers.items()},
            "host": f"{url_id}.lambda-url.{REGION}.on.aws",
            "x-forwarded-proto": "https",
            "x-forwarded-port": "443",
            "x-forwarded-for": "203.0.113.7",
            "x-amzn-trace-id": "Root=1-6568a5f1-2f3c7c1e1b0d9f7e6a5b4c3d",
        },
        "requestContext": {
            "accountId": "anonymous",
            "apiId": url_id,
            "domainName": f"{url_id}.lambda-url.{REGION}.on.aws",
            "domainPrefix": url_id,
            "http": {
                "method": method,
                "path": raw_path,
                "protocol": "HTTP/1.1",
                "sourceIp": "203.0.113.7",
                "userAgent": headers.get("user-agent", "python-httpx/0.28"),
            },
            "requestId": str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime()),
            "timeEpoch": int(time.time() * 1000),
        },
        "isBase64Encoded": b64,
    }
    if query:
        event["queryStringParameters"] = _query(query)
    if body:
        event["body"] = text
    return event


def http_api_v2(method: str, path: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """An API Gateway HTTP API request, payload format 2.0, $default stage."""
    event = function_url(method, path, headers, body)
    api_id = "a1b2c3d4e5"
    domain = f"{api_id}.execute-api.{REGION}.amazonaws.com"
    event["routeKey"] = "ANY /{proxy+}"
    event["pathParameters"] = {"proxy": event["rawPath"].lstrip("/")}
    event["headers"]["host"] = domain
    ctx = event["requestContext"]
    ctx.update(accountId=ACCOUNT, apiId=api_id, domainName=domain, domainPrefix=api_id)
    ctx["routeKey"] = "ANY /{proxy+}"
    return event


def rest_api_v1(
    method: str, path: str, headers: dict[str, str], body: bytes, *, stage: str = "prod"
) -> dict[str, Any]:
    """An API Gateway REST API proxy request (``/{proxy+}``) on a named stage.

    ``path`` is what the function sees; the stage appears only in
    ``requestContext.path``.
    """
    raw_path, query = _split(path)
    text, b64 = _body(body)
    api_id = "k3j4h5g6f7"
    host = f"{api_id}.execute-api.{REGION}.amazonaws.com"
    all_headers = {
        **headers,
        "Host": host,
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Port": "443",
        "X-Forwarded-For": "203.0.113.7",
        "CloudFront-Viewer-Country": "DE",
    }
    qs = _query(query)
    return {
        "resource": "/{proxy+}",
        "path": raw_path,
        "httpMethod": method,
        "headers": all_headers,
        "multiValueHeaders": {k: [v] for k, v in all_headers.items()},
        "queryStringParameters": qs,
        "multiValueQueryStringParameters": {k: [v] for k, v in qs.items()} if qs else None,
        "pathParameters": {"proxy": raw_path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {
            "resourceId": "abc123",
            "resourcePath": "/{proxy+}",
            "httpMethod": method,
            "extendedRequestId": "Zyx-ABCDEF=",
            "requestTime": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime()),
            "path": f"/{stage}{raw_path}",
            "accountId": ACCOUNT,
            "protocol": "HTTP/1.1",
            "stage": stage,
            "domainPrefix": api_id,
            "requestTimeEpoch": int(time.time() * 1000),
            "requestId": str(uuid.uuid4()),
            "identity": {"sourceIp": "203.0.113.7", "userAgent": "python-httpx/0.28"},
            "domainName": host,
            "apiId": api_id,
        },
        "body": text if body else None,
        "isBase64Encoded": b64,
    }


def alb(method: str, path: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """An Application Load Balancer target request (multi-value headers off)."""
    raw_path, query = _split(path)
    text, b64 = _body(body)
    return {
        "requestContext": {
            "elb": {
                "targetGroupArn": (
                    f"arn:aws:elasticloadbalancing:{REGION}:{ACCOUNT}:targetgroup/fk/6d0ecf831eec9f09"
                )
            }
        },
        "httpMethod": method,
        "path": raw_path,
        "queryStringParameters": _query(query) or {},
        "headers": {
            **{k.lower(): v for k, v in headers.items()},
            "host": "fk-alb-1234567890.eu-west-1.elb.amazonaws.com",
            "x-forwarded-for": "203.0.113.7",
            "x-forwarded-port": "443",
            "x-forwarded-proto": "https",
            "x-amzn-trace-id": "Root=1-6568a5f1-2f3c7c1e1b0d9f7e6a5b4c3d",
        },
        "body": text,
        "isBase64Encoded": b64,
    }


def eventbridge_scheduled() -> dict[str, Any]:
    """What an EventBridge rule with ``rate(1 minute)`` and no Input sends."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": REGION,
        "resources": [f"arn:aws:events:{REGION}:{ACCOUNT}:rule/flowkeeper-tick"],
        "detail": {},
    }


def scheduler_input() -> dict[str, Any]:
    """EventBridge Scheduler (SAM ScheduleV2) delivers the target Input verbatim."""
    return {"flowkeeper": {"action": "tick"}}
