"""The dispatcher's HTTP client against real servers on loopback, plain and over TLS.

uvicorn with its h11 and its httptools protocol, and hypercorn, each run in
the test's event loop serving a small ASGI app that answers in every way an
ASGI server frames a response: Content-Length, chunked (a streamed body in
several pieces with pauses), 204 and 304 without a body, Connection: close.
The app names the client's port in every answer, so the tests see which
requests shared a connection.  Over TLS the client must verify the server
against a CA made in the test (trustme) and refuse one it does not trust.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvicorn
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from flowkeeper.dispatch import ConnectError, Dispatcher, HTTPClient, ReadTimeout
from flowkeeper.signing import RequestSigner

PIECES = [b'{"run_id":"r1","pieces":[', b'"' + b"a" * 5000 + b'",', b'"b"]}']


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    port = str(scope["client"][1]).encode()

    async def start(status: int, *headers: tuple[bytes, bytes]) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"x-port", port), *headers],
            }
        )

    if path in ("/length", "/api/flowkeeper/"):
        answer = json.dumps({"run_id": "r1", "received": body.decode()}).encode()
        await start(
            202,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(answer)).encode()),
        )
        await send({"type": "http.response.body", "body": answer})
    elif path == "/chunked":
        await start(202, (b"content-type", b"application/json"))
        for piece in PIECES:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            await asyncio.sleep(0.02)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/no-content":
        await start(204)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/not-modified":
        await start(304, (b"etag", b'"v1"'))
        await send({"type": "http.response.body", "body": b""})
    elif path == "/close":
        await start(200, (b"connection", b"close"), (b"content-length", b"2"))
        await send({"type": "http.response.body", "body": b"ok"})
    elif path == "/slow":
        await asyncio.sleep(3)
        await start(200, (b"content-length", b"0"))
        await send({"type": "http.response.body", "body": b""})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_listening(port: int) -> None:
    for _ in range(500):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        return
    raise RuntimeError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(params=["uvicorn-h11", "uvicorn-httptools", "hypercorn"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class RealServer:
    def __init__(self, kind: str, certs: tuple[Path, Path] | None) -> None:
        self.kind = kind
        self.certs = certs
        self.port = _free_port()
        self.task: asyncio.Task[Any] | None = None
        self.stop = asyncio.Event()
        self.uvicorn: uvicorn.Server | None = None

    @property
    def base(self) -> str:
        return f"{'https' if self.certs else 'http'}://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RealServer:
        cert, key = self.certs or (None, None)
        if self.kind.startswith("uvicorn"):
            config = uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                http=self.kind.split("-")[1],  # type: ignore[arg-type]
                lifespan="off",
                log_level="warning",
                access_log=False,
                ssl_certfile=cert,
                ssl_keyfile=key,
            )
            self.uvicorn = uvicorn.Server(config)
            self.task = asyncio.create_task(self.uvicorn.serve())
        else:
            config = HypercornConfig()
            config.bind = [f"127.0.0.1:{self.port}"]
            config.accesslog = None
            config.graceful_timeout = 1
            if cert and key:
                config.certfile, config.keyfile = str(cert), str(key)
            self.task = asyncio.create_task(
                hypercorn_serve(app, config, shutdown_trigger=self.stop.wait)  # type: ignore[arg-type]
            )
        await _wait_listening(self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)


@pytest.fixture
async def plain(kind: str) -> AsyncIterator[RealServer]:
    async with RealServer(kind, None) as server:
        yield server


@pytest.fixture
async def tls(kind: str, ca: trustme.CA, tmp_path: Path) -> AsyncIterator[RealServer]:
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    async with RealServer(kind, (cert, key)) as server:
        yield server


async def _every_framing(client: HTTPClient, base: str) -> None:
    ports = []
    for round_ in range(2):
        r = await client.post(base + "/length", content=b"hello", headers={})
        assert (r.status_code, json.loads(r.content)) == (
            202,
            {"run_id": "r1", "received": "hello"},
        )
        ports.append(r.headers["x-port"])
        r = await client.post(base + "/chunked", content=b"", headers={})
        assert r.status_code == 202
        assert r.content == b"".join(PIECES)
        assert "content-length" not in r.headers  # it really was chunked
        ports.append(r.headers["x-port"])
        for path, code in (("/no-content", 204), ("/not-modified", 304)):
            r = await client.post(base + path, content=b"", headers={})
            assert (r.status_code, r.content) == (code, b"")
            ports.append(r.headers["x-port"])
        assert round_ == 0 or len(set(ports)) == 1, ports  # one kept-alive connection
    r = await client.post(base + "/close", content=b"", headers={})
    assert (r.status_code, r.content) == (200, b"ok")
    closed_on = r.headers["x-port"]
    r = await client.post(base + "/length", content=b"again", headers={})
    assert json.loads(r.content)["received"] == "again"
    assert r.headers["x-port"] != closed_on  # a new connection after Connection: close


async def test_every_framing_with_reuse(plain: RealServer) -> None:
    client = HTTPClient(read_timeout=2)
    try:
        await _every_framing(client, plain.base)
    finally:
        await client.aclose()


async def test_dispatcher_invokes_and_times_out(plain: RealServer) -> None:
    dispatcher = Dispatcher(plain.base + "/api/flowkeeper", RequestSigner("k"), ack_timeout=0.5)
    try:
        delivery = await dispatcher.invoke("r1", "lease")
        assert delivery.delivered and delivery.status_code == 202
        assert delivery.body is not None
        assert json.loads(delivery.body["received"]) == {"run_id": "r1", "lease": "lease"}
    finally:
        await dispatcher.aclose()
    client = HTTPClient(read_timeout=0.5)
    try:
        with pytest.raises(ReadTimeout):
            await client.post(plain.base + "/slow", content=b"", headers={})
    finally:
        await client.aclose()


async def test_tls_verified_against_the_test_ca(tls: RealServer, ca: trustme.CA) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    client = HTTPClient(read_timeout=2, ssl_context=context)
    try:
        await _every_framing(client, tls.base)
    finally:
        await client.aclose()


async def test_tls_refuses_an_untrusted_server(tls: RealServer) -> None:
    other = ssl.create_default_context()
    trustme.CA().configure_trust(other)
    for context in (None, other):  # the system's CAs; another CA
        client = HTTPClient(ssl_context=context)
        try:
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.post(tls.base + "/length", content=b"", headers={})
        finally:
            await client.aclose()


async def test_tls_refuses_a_certificate_for_another_name(tls: RealServer, ca: trustme.CA) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    client = HTTPClient(ssl_context=context)
    try:
        with pytest.raises(ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|match"):
            await client.post(f"https://localhost:{tls.port}/length", content=b"", headers={})
    finally:
        await client.aclose()


async def test_dispatcher_trusts_ssl_cert_file(
    tls: RealServer, ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(bundle)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    dispatcher = Dispatcher(tls.base + "/api/flowkeeper", RequestSigner("k"))
    try:
        delivery = await dispatcher.invoke("r1", None)
        assert delivery.delivered, delivery.reason
    finally:
        await dispatcher.aclose()
