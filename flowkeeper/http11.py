"""A small HTTP/1.1 client for posting invocations, with keep-alive connections.

Dispatching is flowkeeper's hottest client path: one tiny signed POST per run
segment, answered by a tiny JSON body.  httpx spent about 4 ms of CPU per such
request under concurrency (connection-pool bookkeeping, async-library
detection), more than the whole run's database work, so the dispatcher uses
this instead: plain asyncio streams, HTTP/1.1, ``Content-Length`` or chunked
responses, TLS for https, one idle-connection list per origin.

Proxies and redirects are deliberately not supported: invocations go from the
app (or its scheduler) to the app's own endpoint.  A request that fails on a
reused connection before any response byte arrived is sent once more on a new
connection; invocations are idempotent (a duplicate is refused by the lease),
so that retry is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

_MAX_HEAD = 64 * 1024
_MAX_BODY = 1024 * 1024


class HTTPError(Exception):
    """The request could not be completed (connection, protocol)."""


class ConnectError(HTTPError):
    """No connection could be made (refused, unreachable, TLS failure)."""


class ConnectTimeout(ConnectError):
    pass


class ReadTimeout(HTTPError):
    """The request was sent in full but no complete answer came in time."""


@dataclass(frozen=True, slots=True)
class Response:
    status_code: int
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Client:
    """Keep-alive HTTP/1.1 POSTs; bound to the event loop that first uses it."""

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._ssl: ssl.SSLContext | None = None

    async def post(self, url: str, *, content: bytes, headers: Mapping[str, str]) -> Response:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HTTPError(f"unsupported URL {url!r}")
        origin = _Origin(
            parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        )
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        host = parts.netloc.rsplit("@", 1)[-1]
        lines = [f"POST {target} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(content)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        async with self._slots:
            idle = self._idle.get(origin)
            while idle:
                conn = idle.pop()
                try:
                    return await self._exchange(origin, conn, head + content, reused=True)
                except _StaleConnection:
                    continue
            conn = await self._connect(origin)
            try:
                return await self._exchange(origin, conn, head + content, reused=False)
            except _StaleConnection as exc:
                raise HTTPError(f"connection closed by {origin.host}:{origin.port}") from exc

    async def _connect(self, origin: _Origin) -> _Connection:
        context: ssl.SSLContext | None = None
        if origin.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    origin.host, origin.port, ssl=context, limit=_MAX_HEAD
                )
        except TimeoutError as exc:
            raise ConnectTimeout(f"connecting to {origin.host}:{origin.port} timed out") from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {origin.host}:{origin.port}: {exc}") from exc
        return _Connection(reader, writer)

    async def _exchange(
        self, origin: _Origin, conn: _Connection, request: bytes, *, reused: bool
    ) -> Response:
        keep = False
        got_bytes = False
        try:
            try:
                conn.writer.write(request)
                await conn.writer.drain()
            except (ConnectionError, OSError) as exc:
                if reused:
                    raise _StaleConnection from exc
                raise HTTPError(f"sending to {origin.host}:{origin.port} failed: {exc}") from exc
            try:
                async with asyncio.timeout(self.read_timeout):
                    try:
                        head = await conn.reader.readuntil(b"\r\n\r\n")
                    except asyncio.IncompleteReadError as exc:
                        if reused and not exc.partial:
                            raise _StaleConnection from exc
                        raise HTTPError("connection closed before a response") from exc
                    got_bytes = True
                    status, headers = _parse_head(head)
                    body = await _read_body(conn.reader, headers)
            except TimeoutError as exc:
                raise ReadTimeout("no complete response within the read timeout") from exc
            except (
                ConnectionError,
                OSError,
                asyncio.LimitOverrunError,
                asyncio.IncompleteReadError,
                ValueError,
            ) as exc:
                if reused and not got_bytes:
                    raise _StaleConnection from exc
                raise HTTPError(f"reading from {origin.host}:{origin.port} failed: {exc}") from exc
            keep = headers.get("connection", "").lower() != "close"
            return Response(status, headers, body)
        finally:
            if keep:
                self._idle.setdefault(origin, []).append(conn)
            else:
                conn.close()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


class _StaleConnection(Exception):
    """A kept-alive connection the server had already closed."""


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
        raise HTTPError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    try:
        status = int(status_line[1])
    except ValueError:
        raise HTTPError(f"bad status line: {lines[0][:80]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if status_line[0] == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
        headers["connection"] = "close"
    return status, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            length = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if length == 0:
                await reader.readuntil(b"\r\n")  # trailers end (we send none, expect none)
                return b"".join(chunks)
            size += length
            if size > _MAX_BODY:
                raise HTTPError("response body too large")
            chunks.append(await reader.readexactly(length))
            await reader.readexactly(2)
    length_text = headers.get("content-length")
    if length_text is None:
        # No length: the body runs to the end of the connection.
        headers["connection"] = "close"
        return await reader.read(_MAX_BODY)
    length = int(length_text)
    if length > _MAX_BODY:
        raise HTTPError("response body too large")
    return await reader.readexactly(length) if length else b""
