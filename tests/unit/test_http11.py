"""The dispatcher's HTTP/1.1 client against small real servers on loopback."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from flowkeeper import http11

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


class Server:
    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(r, w)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                w.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=self.ssl_context)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def client() -> AsyncIterator[http11.Client]:
    c = http11.Client(read_timeout=0.5, connect_timeout=1)
    yield c
    await c.aclose()


async def test_keep_alive_reuses_one_connection(client: http11.Client) -> None:
    bodies: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head, body = await _read_request(r)
            assert head.startswith(b"POST /api/flowkeeper/ HTTP/1.1\r\n")
            assert b"\r\nx-sig: abc\r\n" in head.lower()
            bodies.append(body)
            w.write(b'HTTP/1.1 202 Accepted\r\ncontent-length: 15\r\n\r\n{"accepted":1}\n')
            await w.drain()

    async with Server(handler) as server:
        for i in range(3):
            response = await client.post(
                f"http://127.0.0.1:{server.port}/api/flowkeeper/",
                content=f'{{"n":{i}}}'.encode(),
                headers={"X-Sig": "abc"},
            )
            assert response.status_code == 202
            assert response.content == b'{"accepted":1}\n'
        assert server.connections == 1
    assert bodies == [b'{"n":0}', b'{"n":1}', b'{"n":2}']


async def test_chunked_response(client: http11.Client) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n"
        )
        await w.drain()
        await r.read()

    async with Server(handler) as server:
        response = await client.post(f"http://127.0.0.1:{server.port}/", content=b"", headers={})
    assert response.content == b"hello, world"


async def test_stale_kept_alive_connection_is_retried_on_a_new_one(client: http11.Client) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()
        # then close: the client keeps the connection as idle, now dead

    async with Server(handler) as server:
        url = f"http://127.0.0.1:{server.port}/"
        assert (await client.post(url, content=b"1", headers={})).content == b"ok"
        await asyncio.sleep(0.05)
        assert (await client.post(url, content=b"2", headers={})).content == b"ok"
        assert server.connections == 2


async def test_connection_close_is_honoured(client: http11.Client) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 401 Unauthorized\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
        await w.drain()

    async with Server(handler) as server:
        url = f"http://127.0.0.1:{server.port}/"
        for _ in range(2):
            assert (await client.post(url, content=b"", headers={})).status_code == 401
        assert server.connections == 2


async def test_read_timeout_after_sending(client: http11.Client) -> None:
    received = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        received.set()
        await asyncio.sleep(5)

    async with Server(handler) as server:
        with pytest.raises(http11.ReadTimeout):
            await client.post(f"http://127.0.0.1:{server.port}/", content=b"x", headers={})
    assert received.is_set()  # the request arrived in full before the timeout


async def test_refused_connection(client: http11.Client) -> None:
    async with Server(lambda r, w: asyncio.sleep(0)) as server:
        port = server.port
    with pytest.raises(http11.HTTPError, match="cannot connect"):
        await client.post(f"http://127.0.0.1:{port}/", content=b"", headers={})


async def test_garbage_response(client: http11.Client) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await w.drain()

    async with Server(handler) as server:
        with pytest.raises(http11.HTTPError, match="not an HTTP"):
            await client.post(f"http://127.0.0.1:{server.port}/", content=b"", headers={})


async def test_https(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ntls")
        await w.drain()
        await r.read()

    client = http11.Client()
    client._ssl = ssl.create_default_context(cafile=str(cert))  # trust the test CA
    try:
        async with Server(handler, server_ctx) as server:
            response = await client.post(
                f"https://127.0.0.1:{server.port}/", content=b"", headers={}
            )
        assert response.content == b"tls"
    finally:
        await client.aclose()
    # The default context refuses an unknown certificate.
    strict = http11.Client()
    try:
        async with Server(handler, server_ctx) as server:
            with pytest.raises(http11.HTTPError, match="cannot connect"):
                await strict.post(f"https://127.0.0.1:{server.port}/", content=b"", headers={})
    finally:
        await strict.aclose()
