"""A small HTTP/1.1 client for posting invocations, with keep-alive connections.

Dispatching is flowkeeper's hottest client path: one tiny signed POST per run
segment, answered by a tiny JSON body.  httpx spent about 4 ms of CPU per such
request under concurrency (its connection pool scans every connection for
every request), more than the whole run's database work, so the dispatcher
uses this instead: plain asyncio streams, HTTP/1.1, TLS for https, one
idle-connection list per origin.  ``bench/transports.py`` measures it against
httpx and aiohttp end to end.

Responses are read with every framing RFC 9112 (section 6) allows:
``Content-Length`` (repeated equal values too), chunked (with extensions and
trailers), close-delimited (no length: the body runs to the end of the
connection), interim 1xx responses before the final one, and no body for
HEAD, 1xx, 204 and 304 whatever the headers say.  Conflicting or malformed
framing is refused, and a connection that ends before the response does is
an error, never a short answer.

Proxies, redirects and content codings are deliberately not supported:
invocations go from the app (or its scheduler) to the app's own endpoint.  A
request that fails on a reused connection before any response byte arrived is
sent once more on a new connection; invocations are idempotent (a duplicate is
refused by the lease), so that retry is safe.

    HTTPError (a DispatchError)   the request could not be completed
    ├── ConnectError              no connection (refused, unreachable, TLS)
    │   └── ConnectTimeout
    ├── ReadTimeout               sent in full, no complete answer in time
    └── ProtocolError             the answer is not HTTP/1.1 we can read
                                  (bad framing, cut short, too large)
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .errors import DispatchError

_MAX_HEAD = 64 * 1024
_MAX_BODY = 1024 * 1024
_MAX_INTERIM = 16  # 1xx responses before the final one
_HEX = frozenset(b"0123456789abcdefABCDEF")


class HTTPError(DispatchError):
    """The request could not be completed (connection, protocol)."""


class ConnectError(HTTPError):
    """No connection could be made (refused, unreachable, TLS failure)."""


class ConnectTimeout(ConnectError):
    pass


class ReadTimeout(HTTPError):
    """The request was sent in full but no complete answer came in time."""


class ProtocolError(HTTPError):
    """The server's answer was cut short, too large, or not HTTP/1.1 we can read."""


@dataclass(frozen=True, slots=True)
class Response:
    status_code: int
    headers: dict[str, str]
    content: bytes
    trailers: dict[str, str] = field(default_factory=dict)

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
    """Keep-alive HTTP/1.1 requests; bound to the event loop that first uses it.

    ``ssl_context`` verifies https servers (default: the system's CAs).
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        max_connections: int = 64,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._ssl = ssl_context

    async def post(self, url: str, *, content: bytes, headers: Mapping[str, str]) -> Response:
        return await self.request("POST", url, content=content, headers=headers)

    async def request(
        self, method: str, url: str, *, content: bytes = b"", headers: Mapping[str, str]
    ) -> Response:
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
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
        if content or method not in ("GET", "HEAD"):
            lines.append(f"Content-Length: {len(content)}")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + content
        head_only = method == "HEAD"
        async with self._slots:
            idle = self._idle.get(origin)
            while idle:
                conn = idle.pop()
                try:
                    return await self._exchange(origin, conn, request, head_only, reused=True)
                except _StaleConnection:
                    continue
            conn = await self._connect(origin)
            try:
                return await self._exchange(origin, conn, request, head_only, reused=False)
            except _StaleConnection as exc:
                raise ProtocolError(
                    f"{origin.host}:{origin.port} closed the connection before answering"
                ) from exc

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
        except OSError as exc:  # ssl.SSLError (an unverified certificate) is one
            raise ConnectError(f"cannot connect to {origin.host}:{origin.port}: {exc}") from exc
        return _Connection(reader, writer)

    async def _exchange(
        self, origin: _Origin, conn: _Connection, request: bytes, head_only: bool, *, reused: bool
    ) -> Response:
        keep = False
        reading = _Reading(conn.reader, head_only)
        where = f"{origin.host}:{origin.port}"
        try:
            try:
                conn.writer.write(request)
                await conn.writer.drain()
            except (ConnectionError, OSError) as exc:
                if reused:
                    raise _StaleConnection from exc
                raise HTTPError(f"sending to {where} failed: {exc}") from exc
            try:
                async with asyncio.timeout(self.read_timeout):
                    response, keep = await reading.response()
            except TimeoutError as exc:
                raise ReadTimeout(f"no complete response from {where} in time") from exc
            except asyncio.IncompleteReadError as exc:
                if reused and reading.received == 0:
                    raise _StaleConnection from exc
                raise ProtocolError(f"{where} closed the connection {reading.stage}") from exc
            except (ConnectionError, OSError) as exc:
                if reused and reading.received == 0:
                    raise _StaleConnection from exc
                raise HTTPError(f"reading from {where} failed {reading.stage}: {exc}") from exc
            except asyncio.LimitOverrunError as exc:
                raise ProtocolError(f"{where} sent a line too long {reading.stage}") from exc
            except ProtocolError as exc:
                raise ProtocolError(f"{where}: {exc}") from None
            return response
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


class _Reading:
    """Reads one response (after any 1xx) from a stream; says where it got to."""

    __slots__ = ("head_only", "reader", "received", "stage")

    def __init__(self, reader: asyncio.StreamReader, head_only: bool) -> None:
        self.reader = reader
        self.head_only = head_only
        self.received = 0  # bytes of the response read so far
        self.stage = "before answering"

    async def response(self) -> tuple[Response, bool]:
        """The final response, and whether the connection can carry another request."""
        for _ in range(_MAX_INTERIM + 1):
            head = await self.reader.readuntil(b"\r\n\r\n")
            self.received += len(head)
            self.stage = "in the middle of the response"
            version, status, headers = _parse_head(head)
            if status >= 200:
                break
            if status == 101:
                raise ProtocolError("switching protocols was not asked for (HTTP 101)")
            # An interim response (100 Continue, 103 Early Hints): the final one follows.
        else:
            raise ProtocolError(f"more than {_MAX_INTERIM} interim (1xx) responses")
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
        trailers: dict[str, str] = {}
        transfer = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if self.head_only or status in (204, 304):
            body = b""  # no content, whatever the headers say (RFC 9112 6.3)
        elif transfer is not None:
            if length is not None:
                # RFC 9112 6.3: a sign of request smuggling or response splitting.
                raise ProtocolError(
                    "conflicting framing: both Transfer-Encoding and Content-Length"
                )
            if version == "HTTP/1.0":
                raise ProtocolError("faulty framing: Transfer-Encoding in an HTTP/1.0 response")
            codings = [c.strip().lower() for c in transfer.split(",") if c.strip()]
            if codings != ["chunked"]:
                raise ProtocolError(f"unsupported Transfer-Encoding {transfer!r} (only chunked)")
            self.stage = "in the middle of a chunked body"
            body, trailers = await self._chunked()
        elif length is not None:
            size = _content_length(length)
            if size > _MAX_BODY:
                raise ProtocolError(f"response body too large ({size} bytes)")
            self.stage = f"in the middle of a {size}-byte body"
            body = await self._exactly(size)
        else:
            self.stage = "before the end of a body without a length"
            body = await self._to_close()
            keep = False
        return Response(status, headers, body, trailers), keep

    async def _exactly(self, size: int) -> bytes:
        try:
            data = await self.reader.readexactly(size) if size else b""
        except asyncio.IncompleteReadError as exc:
            self.stage = f"after {len(exc.partial)} of {size} body bytes"
            raise
        self.received += size
        return data

    async def _to_close(self) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while data := await self.reader.read(65536):
            size += len(data)
            if size > _MAX_BODY:
                raise ProtocolError("response body too large")
            chunks.append(data)
        self.received += size
        return b"".join(chunks)

    async def _chunked(self) -> tuple[bytes, dict[str, str]]:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = await self.reader.readuntil(b"\r\n")
            self.received += len(line)
            digits = line[:-2].split(b";", 1)[0].strip(b" \t")
            if not digits or len(digits) > 15 or not _HEX.issuperset(digits):
                raise ProtocolError(f"bad chunk size line {line[:40]!r}")
            size = int(digits, 16)
            if size == 0:
                break
            total += size
            if total > _MAX_BODY:
                raise ProtocolError("response body too large")
            data = await self.reader.readexactly(size + 2)
            self.received += size + 2
            if data[-2:] != b"\r\n":
                raise ProtocolError("a chunk is longer than its size line says")
            chunks.append(data[:-2])
        # The trailer section: header lines up to an empty line.
        self.stage = "in the middle of a chunked body's trailers"
        trailer_lines: list[bytes] = []
        seen = 0
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            seen += len(line)
            if seen > _MAX_HEAD:
                raise ProtocolError("trailers too large")
            trailer_lines.append(line[:-2])
        self.received += seen + 2
        return b"".join(chunks), _parse_fields(trailer_lines)


def _parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    lines = head[:-4].split(b"\r\n")
    status_line = lines[0].decode("latin-1")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ProtocolError(f"not an HTTP/1.x response: {status_line[:80]!r}")
    if len(code) != 3 or not code.isdigit() or rest[3:4] not in ("", " "):
        raise ProtocolError(f"bad status line: {status_line[:80]!r}")
    return version, int(code), _parse_fields(lines[1:])


def _parse_fields(lines: list[bytes]) -> dict[str, str]:
    """Header (or trailer) lines into a dict of lower-case names; repeats joined by ", "."""
    fields: dict[str, str] = {}
    last = ""
    for raw in lines:
        line = raw.decode("latin-1")
        if line[:1] in (" ", "\t"):
            if not last:
                raise ProtocolError("a header continuation line with no header before it")
            fields[last] += " " + line.strip()  # obsolete line folding (RFC 9112 5.2)
            continue
        name, sep, value = line.partition(":")
        name = name.rstrip(" \t").lower()
        if not sep or not name or " " in name or "\t" in name:
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        value = value.strip(" \t")
        fields[name] = f"{fields[name]}, {value}" if name in fields else value
        last = name
    return fields


def _content_length(value: str) -> int:
    """One length from a Content-Length field, which may repeat it (RFC 9110 8.6)."""
    values = {v.strip(" \t") for v in value.split(",")}
    if len(values) != 1:
        raise ProtocolError(f"conflicting framing: Content-Length {value!r}")
    (text,) = values
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ProtocolError(f"bad framing: Content-Length {value!r}")
    return int(text)
