"""Every response framing HTTP/1.1 allows, read by the dispatcher from a real socket.

A scripted raw server on 127.0.0.1 answers each request with the next reply
from a list: some bytes, written as separate TCP segments with pauses between
them, then either waiting for the next request on the same connection or
closing it.  The dispatcher must read every framing of RFC 9112 section 6
(content-length, chunked with extensions and trailers, close-delimited, 1xx
interim responses, bodiless statuses), reuse the connection whenever the
framing allows it, and report a body cut short as a failed delivery, never as
an answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from flowkeeper.dispatch import Delivery, Dispatcher
from flowkeeper.signing import RequestSigner

ANSWER = {"run_id": "r1", "accepted": True, "note": "x" * 300}
BODY = json.dumps(ANSWER).encode()


@dataclass
class Reply:
    segments: list[bytes]
    close: bool = False  # close the connection after writing
    pause: float = 0.05  # between segments


@dataclass
class ScriptedServer:
    replies: list[Reply]
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                reply = self.replies.pop(0)
                for i, segment in enumerate(reply.segments):
                    if i:
                        await asyncio.sleep(reply.pause)
                    writer.write(segment)
                    await writer.drain()
                if reply.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> ScriptedServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/api/flowkeeper"


@pytest.fixture
async def make_dispatcher() -> AsyncIterator[list[Dispatcher]]:
    made: list[Dispatcher] = []
    yield made
    for d in made:
        await d.aclose()


async def invoke_all(
    made: list[Dispatcher], replies: list[Reply], *, ack_timeout: float = 2.0
) -> tuple[list[Delivery], ScriptedServer]:
    count = len(replies)
    async with ScriptedServer(list(replies)) as server:
        dispatcher = Dispatcher(server.endpoint, RequestSigner("k"), ack_timeout=ack_timeout)
        made.append(dispatcher)
        deliveries = [await dispatcher.invoke("r1", "lease") for _ in range(count)]
    return deliveries, server


def split(data: bytes, *sizes: int) -> list[bytes]:
    """``data`` cut at the given offsets (one TCP segment per piece)."""
    pieces, start = [], 0
    for end in sizes:
        pieces.append(data[start:end])
        start = end
    return [*pieces, data[start:]]


def chunked(body: bytes, *, trailers: bytes = b"") -> bytes:
    return (
        f'{40:x};name=value;quoted="a b"\r\n'.encode()
        + body[:40]
        + b"\r\n"
        + f"{len(body) - 40:X}\r\n".encode()  # upper-case hex is allowed
        + body[40:]
        + b"\r\n0;last\r\n"
        + trailers
        + b"\r\n"
    )


def assert_answered(delivery: Delivery, code: int = 202) -> None:
    assert delivery.reason == ""
    assert delivery.delivered
    assert delivery.status_code == code
    assert delivery.body == ANSWER


# close-delimited ------------------------------------------------------------------
async def test_close_delimited_body_in_several_segments(make_dispatcher: list[Dispatcher]) -> None:
    response = b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\n\r\n" + BODY
    (delivery,), server = await invoke_all(
        make_dispatcher, [Reply(split(response, 30, 70, 90, 200, 330), close=True)]
    )
    assert_answered(delivery)
    assert server.connections == 1


async def test_http10_response_without_length_reads_to_close(
    make_dispatcher: list[Dispatcher],
) -> None:
    response = b"HTTP/1.0 202 Accepted\r\n\r\n" + BODY
    replies = [Reply(split(response, 40, 100), close=True) for _ in range(2)]
    deliveries, server = await invoke_all(make_dispatcher, replies)
    for delivery in deliveries:
        assert_answered(delivery)
    assert server.connections == 2  # a close-delimited body ends its connection


# content-length -------------------------------------------------------------------
async def test_content_length_body_in_segments_then_reuse(
    make_dispatcher: list[Dispatcher],
) -> None:
    response = f"HTTP/1.1 202 Accepted\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY
    replies = [Reply(split(response, 10, 50, 200)) for _ in range(3)]
    deliveries, server = await invoke_all(make_dispatcher, replies)
    for delivery in deliveries:
        assert_answered(delivery)
    assert server.connections == 1


async def test_repeated_equal_content_lengths_are_read_or_refused_clearly(
    make_dispatcher: list[Dispatcher],
) -> None:
    # RFC 9110 8.6 lets a recipient either take the one value or refuse the message
    # (aiohttp's llhttp refuses); never a misread body.
    n = len(BODY)
    response = (
        f"HTTP/1.1 202 Accepted\r\nContent-Length: {n}, {n}\r\nContent-Length: {n}\r\n\r\n".encode()
        + BODY
    )
    deliveries, _ = await invoke_all(make_dispatcher, [Reply([response]), Reply([response])])
    for delivery in deliveries:
        if delivery.delivered:
            assert_answered(delivery)
        else:
            assert delivery.status_code is None
            assert delivery.reason.startswith("ProtocolError: ")
            assert "Content-Length" in delivery.reason


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 202 Accepted\r\nContent-Length: 10\r\nContent-Length: 12\r\n\r\n",
        b"HTTP/1.1 202 Accepted\r\nContent-Length: 10, 12\r\n\r\n",
        b"HTTP/1.1 202 Accepted\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 202 Accepted\r\nContent-Length: 0x10\r\n\r\n",
        b"HTTP/1.1 202 Accepted\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["two-headers", "list", "negative", "hex", "with-chunked"],
)
async def test_conflicting_or_invalid_framing_is_refused(
    make_dispatcher: list[Dispatcher], head: bytes
) -> None:
    (delivery,), _ = await invoke_all(make_dispatcher, [Reply([head + b"0123456789ab"])])
    assert not delivery.delivered
    assert delivery.status_code is None
    assert "length" in delivery.reason.lower() or "framing" in delivery.reason.lower()


# chunked ----------------------------------------------------------------------------
async def test_chunked_with_extensions_and_trailers_then_reuse(
    make_dispatcher: list[Dispatcher],
) -> None:
    response = b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(
        BODY, trailers=b"X-Checksum: abc\r\nServer-Timing: db;dur=3\r\n"
    )
    replies = [Reply(split(response, 20, 60, 61, 130, len(response) - 3)) for _ in range(3)]
    deliveries, server = await invoke_all(make_dispatcher, replies)
    for delivery in deliveries:
        assert_answered(delivery)
    assert server.connections == 1
    assert len(server.requests) == 3


async def test_chunked_without_trailers_every_byte_its_own_segment(
    make_dispatcher: list[Dispatcher],
) -> None:
    response = b"HTTP/1.1 202 Accepted\r\ntransfer-encoding: Chunked\r\n\r\n" + chunked(BODY)
    head_end = response.index(b"\r\n\r\n") + 4
    segments = [response[:head_end]] + [bytes([b]) for b in response[head_end:]]
    replies = [Reply(segments, pause=0.0005), Reply([response])]
    deliveries, server = await invoke_all(make_dispatcher, replies)
    for delivery in deliveries:
        assert_answered(delivery)
    assert server.connections == 1


# 1xx, bodiless statuses -------------------------------------------------------------
async def test_interim_1xx_responses_are_skipped(make_dispatcher: list[Dispatcher]) -> None:
    final = f"HTTP/1.1 202 Accepted\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY
    reply = Reply(
        [
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
            final,
        ]
    )
    deliveries, server = await invoke_all(make_dispatcher, [reply, Reply([final])])
    for delivery in deliveries:
        assert_answered(delivery)
    assert server.connections == 1


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        # A 204 or 304 has no content whatever its headers say (RFC 9112 6.3).
        b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\nETag: "x"\r\n\r\n',
        b"HTTP/1.1 304 Not Modified\r\n\r\n",
    ],
    ids=["204", "204-with-length", "304-with-length", "304"],
)
async def test_bodiless_statuses_end_at_the_head_and_keep_the_connection(
    make_dispatcher: list[Dispatcher], head: bytes
) -> None:
    final = f"HTTP/1.1 202 Accepted\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY
    deliveries, server = await invoke_all(
        make_dispatcher, [Reply([head]), Reply([final])], ack_timeout=1.0
    )
    first, second = deliveries
    assert first.status_code == int(head.split()[1])
    assert not first.delivered  # not flowkeeper's answer, but an answer: not "in flight"
    assert "in flight" not in first.reason
    assert_answered(second)
    assert server.connections == 1


# connection: close ------------------------------------------------------------------
async def test_connection_close_opens_a_new_connection(make_dispatcher: list[Dispatcher]) -> None:
    response = (
        f"HTTP/1.1 202 Accepted\r\nConnection: close\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    replies = [Reply(split(response, 50), close=True) for _ in range(2)]
    deliveries, server = await invoke_all(make_dispatcher, replies)
    for delivery in deliveries:
        assert_answered(delivery)
    assert server.connections == 2


async def test_every_framing_on_one_kept_alive_connection(
    make_dispatcher: list[Dispatcher],
) -> None:
    with_length = f"HTTP/1.1 202 Accepted\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY
    with_chunks = b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(
        BODY, trailers=b"X-T: 1\r\n"
    )
    replies = [
        Reply(split(with_length, 5, 100)),
        Reply(split(with_chunks, 70, 200)),
        Reply([b"HTTP/1.1 100 Continue\r\n\r\n", with_chunks]),
        Reply([b"HTTP/1.1 204 No Content\r\n\r\n"]),
        Reply([with_length]),
        Reply([b"HTTP/1.1 202 Accepted\r\n\r\n", BODY[:100], BODY[100:]], close=True),
    ]
    deliveries, server = await invoke_all(make_dispatcher, replies)
    assert [d.status_code for d in deliveries] == [202, 202, 202, 204, 202, 202]
    for delivery in [*deliveries[:3], *deliveries[4:]]:
        assert_answered(delivery)
    assert server.connections == 1


# cut short --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "segments",
    [
        [f"HTTP/1.1 202 Accepted\r\nContent-Length: {len(BODY)}\r\n\r\n".encode(), BODY[:100]],
        [b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n", chunked(BODY)[:60]],
        # The last chunk arrived but not the end of the trailer section.
        [b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n", chunked(BODY)[:-2]],
        [b"HTTP/1.1 202 Accepted\r\nContent-Len"],
    ],
    ids=["content-length", "chunked", "chunked-trailers", "head"],
)
async def test_server_closing_mid_response_is_a_failed_delivery(
    make_dispatcher: list[Dispatcher], segments: list[bytes]
) -> None:
    (delivery,), _ = await invoke_all(make_dispatcher, [Reply(segments, close=True)])
    assert not delivery.delivered
    assert delivery.status_code is None
    assert delivery.body is None
    assert "closed" in delivery.reason.lower()


async def test_bad_chunk_size_is_a_failed_delivery(make_dispatcher: list[Dispatcher]) -> None:
    response = (
        b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    )
    (delivery,), _ = await invoke_all(make_dispatcher, [Reply([response])])
    assert not delivery.delivered
    assert "chunk" in delivery.reason.lower()
