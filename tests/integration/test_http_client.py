"""The dispatcher's HTTP client (aiohttp underneath) against small raw servers on loopback.

Kept from the hand-written client's tests: the behaviours the dispatcher relies
on (keep-alive reuse, a stale kept-alive connection retried, Connection: close
honoured, timeouts, refused connections, garbage) hold with the library too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from flowkeeper import DispatchError
from flowkeeper.dispatch import (
    ConnectError,
    HTTPClient,
    HTTPError,
    ProtocolError,
    ReadTimeout,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
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

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def client() -> AsyncIterator[HTTPClient]:
    c = HTTPClient(read_timeout=0.5, connect_timeout=1)
    yield c
    await c.aclose()


def test_errors_are_dispatch_errors() -> None:
    for cls in (HTTPError, ConnectError, ReadTimeout, ProtocolError):
        assert issubclass(cls, DispatchError)


async def test_keep_alive_reuses_one_connection(client: HTTPClient) -> None:
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
                f"{server.url}/api/flowkeeper/",
                content=f'{{"n":{i}}}'.encode(),
                headers={"X-Sig": "abc"},
            )
            assert response.status_code == 202
            assert response.content == b'{"accepted":1}\n'
        assert server.connections == 1
    assert bodies == [b'{"n":0}', b'{"n":1}', b'{"n":2}']


async def test_stale_kept_alive_connection_is_retried_on_a_new_one(client: HTTPClient) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()
        # then close: a kept-alive connection, now dead

    async with Server(handler) as server:
        assert (await client.post(server.url, content=b"1", headers={})).content == b"ok"
        await asyncio.sleep(0.05)
        assert (await client.post(server.url, content=b"2", headers={})).content == b"ok"
        assert server.connections == 2


async def test_server_closing_a_reused_connection_unread_is_retried(client: HTTPClient) -> None:
    """The race the pool cannot see: the server drops the request it gets on a kept connection."""
    answered = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal answered
        await _read_request(r)
        answered += 1
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()
        if answered == 1:
            await r.readuntil(b"\r\n\r\n")  # the second request arrives, unanswered
            return  # close
        await r.read()

    async with Server(handler) as server:
        assert (await client.post(server.url, content=b"", headers={})).content == b"ok"
        assert (await client.post(server.url, content=b"", headers={})).content == b"ok"
        assert server.connections == 2


async def test_a_fresh_connection_closed_unanswered_is_not_retried(client: HTTPClient) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)

    async with Server(handler) as server:
        with pytest.raises(ProtocolError, match="closed the connection before answering"):
            await client.post(server.url, content=b"x", headers={})
        assert server.connections == 1


async def test_connection_close_is_honoured(client: HTTPClient) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 401 Unauthorized\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.2)  # the client must not wait for, or reuse, this connection

    async with Server(handler) as server:
        for _ in range(2):
            assert (await client.post(server.url, content=b"", headers={})).status_code == 401
        assert server.connections == 2


async def test_read_timeout_after_sending(client: HTTPClient) -> None:
    received = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        received.set()
        await asyncio.sleep(5)

    async with Server(handler) as server:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ReadTimeout):
            await client.post(server.url, content=b"x", headers={})
        assert 0.4 < loop.time() - started < 2
    assert received.is_set()  # the request arrived in full before the timeout


async def test_refused_connection(client: HTTPClient) -> None:
    async with Server(lambda r, w: asyncio.sleep(0)) as server:
        url = server.url
    with pytest.raises(ConnectError, match="cannot connect"):
        await client.post(url, content=b"", headers={})


async def test_garbage_response(client: HTTPClient) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await w.drain()

    async with Server(handler) as server:
        with pytest.raises(ProtocolError, match="malformed response"):
            await client.post(server.url, content=b"", headers={})


async def test_body_over_the_limit_is_refused(client: HTTPClient) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2000000\r\n\r\n")
        for _ in range(40):
            w.write(b"x" * 50_000)
            await w.drain()

    async with Server(handler) as server:
        with pytest.raises(ProtocolError, match="over 1 MiB"):
            await client.post(server.url, content=b"", headers={})
