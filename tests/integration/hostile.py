"""Tools for the hostile-input tests: raw HTTP over a socket, and a log watcher."""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    port: int,
    method: str,
    target: str | bytes,
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    body: bytes = b"",
) -> Raw:
    """One HTTP/1.1 request over a blocking socket, bytes exactly as given."""
    if isinstance(target, str):
        target = target.encode()
    head = [
        method.encode() + b" " + target + b" HTTP/1.1",
        b"host: 127.0.0.1",
        b"connection: close",
    ]
    head += [name + b": " + value for name, value in headers]
    head.append(b"content-length: " + str(len(body)).encode())
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    data = b"".join(chunks)
    assert data, f"the server dropped the connection ({method} {target!r})"
    header_block, _, rest = data.partition(b"\r\n\r\n")
    lines = header_block.split(b"\r\n")
    status = int(lines[0].split()[1])
    parsed = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        parsed[name.decode().lower()] = value.strip().decode("latin-1")
    return Raw(status, parsed, rest)


class LogWatch:
    """Every record from flowkeeper and uvicorn while a test runs."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    def attach(self) -> None:
        # uvicorn's loggers do not propagate to the root where caplog listens.
        logging.getLogger("uvicorn").addHandler(self.caplog.handler)

    def detach(self) -> None:
        logging.getLogger("uvicorn").removeHandler(self.caplog.handler)

    def clear(self) -> None:
        self.caplog.clear()

    def assert_clean(self) -> None:
        bad = [
            r
            for r in self.caplog.records
            if r.levelno >= logging.ERROR or r.exc_info is not None or r.exc_text
        ]
        assert not bad, [f"{r.name} {r.levelname}: {r.getMessage()}" for r in bad]

    def warnings(self) -> list[logging.LogRecord]:
        return [
            r
            for r in self.caplog.records
            if r.name == "flowkeeper" and r.levelno == logging.WARNING
        ]
