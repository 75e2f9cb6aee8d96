"""AWS Lambda's own part, faked (it cannot run here): environments, Invoke, function URL.

Everything inside the function is real: the handler, mangum, the endpoint,
the engine, Postgres.  What is faked is what AWS does around it:

* an execution environment imports the code once (``make_handler()``) and
  then runs one invocation at a time on one thread, which is what Lambda does;
  concurrent invocations get more environments;
* ``context.get_remaining_time_in_millis()`` counts down from the timeout;
* a function URL turns an HTTP request into a payload-2.0 event and the
  handler's answer back into HTTP (buffered, as a BUFFERED URL does);
* ``client().invoke(...)`` stands in for boto3's Lambda client.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from . import lambda_events

FUNCTION_NAME = "flowkeeper-test-fn"


class FakeContext:
    """The attributes and method of Lambda's Python context object that code uses."""

    def __init__(self, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout
        self.aws_request_id = str(uuid.uuid4())
        self.function_name = FUNCTION_NAME
        self.function_version = "$LATEST"
        self.invoked_function_arn = (
            f"arn:aws:lambda:{lambda_events.REGION}:{lambda_events.ACCOUNT}:function:"
            f"{FUNCTION_NAME}"
        )
        self.memory_limit_in_mb = "512"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


@dataclass
class Environment:
    handler: Any
    thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="lambda-env")
    )
    invocations: int = 0


class FakeLambda:
    """Runs ``make_handler()`` environments the way Lambda schedules invocations."""

    def __init__(
        self, make_handler: Callable[[], Any], *, timeout: float = 30.0, max_envs: int = 16
    ) -> None:
        self.make_handler = make_handler
        self.timeout = timeout
        self.max_envs = max_envs
        self.environments: list[Environment] = []
        self._idle: list[Environment] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self.errors: list[BaseException] = []
        self.async_invocations = 0

    async def __aenter__(self) -> FakeLambda:
        self._loop = asyncio.get_running_loop()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()
        loop = asyncio.get_running_loop()
        for env in self.environments:
            if env.handler is not None:
                await loop.run_in_executor(env.thread, env.handler.close)
            env.thread.shutdown(wait=True)

    async def drain(self) -> None:
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def _take(self) -> Environment:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            if len(self.environments) >= self.max_envs:
                raise RuntimeError("TooManyRequestsException: concurrency limit reached")
            env = Environment(handler=None)
            self.environments.append(env)
            return env

    def _give_back(self, env: Environment) -> None:
        with self._lock:
            self._idle.append(env)

    async def invoke(self, event: dict[str, Any]) -> Any:
        """One synchronous (RequestResponse) invocation; returns the handler's result."""
        env = self._take()
        loop = asyncio.get_running_loop()

        def run() -> Any:
            if env.handler is None:  # the init phase: import the code once
                env.handler = self.make_handler()
            env.invocations += 1
            return env.handler(json.loads(json.dumps(event)), FakeContext(self.timeout))

        try:
            return await loop.run_in_executor(env.thread, run)
        except BaseException as exc:
            self.errors.append(exc)
            raise
        finally:
            self._give_back(env)

    def client(self) -> FakeLambdaClient:
        return FakeLambdaClient(self)

    def submit_async(self, event: dict[str, Any]) -> None:
        """InvocationType=Event: queued, run soon on some environment."""
        assert self._loop is not None

        def start() -> None:
            future = asyncio.ensure_future(self.invoke(event))
            self._pending.add(future)
            future.add_done_callback(self._pending.discard)
            future.add_done_callback(lambda f: f.cancelled() or f.exception())

        self.async_invocations += 1
        self._loop.call_soon_threadsafe(start)

    # the function URL ---------------------------------------------------------------
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """As an ASGI app, the function URL in front of the environments."""
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        event = lambda_events.function_url(request.method, path, dict(request.headers), body)
        result = await self.invoke(event)
        payload = result.get("body") or ""
        raw = base64.b64decode(payload) if result.get("isBase64Encoded") else payload.encode()
        response = Response(raw, status_code=result["statusCode"], headers=result.get("headers"))
        await response(scope, receive, send)


class FakeLambdaClient:
    """boto3's ``client("lambda").invoke`` as the dispatcher calls it."""

    def __init__(self, fake: FakeLambda) -> None:
        self.fake = fake
        self.calls: list[dict[str, Any]] = []

    def invoke(self, **kwargs: Any) -> dict[str, Any]:
        assert kwargs["FunctionName"] == FUNCTION_NAME
        self.calls.append(kwargs)
        event = json.loads(kwargs["Payload"])
        if kwargs.get("InvocationType") == "Event":
            self.fake.submit_async(event)
            return {"StatusCode": 202}
        assert self.fake._loop is not None
        future = asyncio.run_coroutine_threadsafe(self.fake.invoke(event), self.fake._loop)
        return {"StatusCode": 200, "Payload": json.dumps(future.result(timeout=60)).encode()}
