"""Generated bad input at the endpoint, over real HTTP: never a 500, never a state change.

Hypothesis builds requests from random bodies (binary, JSON, oversized,
truncated, and real invocations of a run that is due right now), random
headers, and signatures that are missing, malformed, forged, made for other
bytes, another path or another key, or too old or from the future.  Unless
the signature is valid, the database must stay exactly as it was, although
the due run would be claimed by any validly signed invocation (a control at
the end shows it is).  Validly signed garbage gets a 4xx or a refusal.
A second test sends what a client library will not: bodies shorter than
their Content-Length, and connections dropped mid-body.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowkeeper import Context, FlowKeeper
from flowkeeper.signing import MAX_AGE_SECONDS, MAX_SKEW_SECONDS, SIGNATURE_HEADER, sign_request
from tests.helpers import KEY, make_fk, serve

from .summary import record

LIMIT = 4096  # the endpoint's body limit in this test (the minimum allowed is 1024)
PATH = "/api/flowkeeper/"
TICK_PATH = "/api/flowkeeper/tick"
EXAMPLES = 400
# Headers the generated extras leave alone: framing, and the ones under test.
RESERVED_HEADERS = {
    "content-length",
    "transfer-encoding",
    "host",
    "expect",
    "connection",
    "upgrade",
    "authorization",
    SIGNATURE_HEADER.lower(),
}


@dataclass
class Target:
    fk: FlowKeeper
    http: httpx.AsyncClient
    conn: asyncpg.Connection
    due_run: str  # claimable by any validly signed invocation
    done_run: str  # completed
    tried: int = 0


async def snapshot(conn: asyncpg.Connection) -> tuple[object, ...]:
    return (
        tuple(await conn.fetch("SELECT * FROM flowkeeper.runs ORDER BY id")),
        tuple(await conn.fetch("SELECT * FROM flowkeeper.steps ORDER BY run_id, key")),
        tuple(await conn.fetch("SELECT * FROM flowkeeper.events ORDER BY id")),
    )


@pytest.fixture
async def target(database_url: str, conn: asyncpg.Connection) -> AsyncIterator[Target]:
    fk = make_fk(database_url, max_body_bytes=LIMIT, cron_secret="the-cron-secret")

    @fk.workflow("echo")
    async def echo(ctx: Context, n: int) -> int:
        return await ctx.step("echo", lambda: n)

    async with serve(fk) as server:
        done = await fk.trigger("echo", 1)  # pushed: runs to completion
        assert await fk.result(done.run_id, timeout=20) == 1
        dispatcher, fk.dispatcher = fk.dispatcher, None
        due = await fk.trigger("echo", 2)  # not pushed: due for whoever claims it
        fk.dispatcher = dispatcher
        async with httpx.AsyncClient(base_url=server.base_url, timeout=20) as http:
            t = Target(fk, http, conn, due.run_id, done.run_id)
            yield t
            record(bad_inputs_tried=t.tried)
    await fk.aclose()


# strategies -------------------------------------------------------------------------
# Printable ASCII without surrounding blanks: what HTTP/1.1 lets a client send.
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=0, max_size=40
).map(str.strip)
header_names = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyz-0123456789"), min_size=1, max_size=20
).filter(lambda h: h.lower() not in RESERVED_HEADERS)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def invocation(run_id: str, lease: object = None) -> bytes:
    return json.dumps({"run_id": run_id, "lease": lease}).encode()


@st.composite
def bodies(draw: st.DrawFn, due_run: str) -> bytes:
    """Bodies for unsigned or badly signed requests: valid invocations included."""
    kind = draw(st.sampled_from(["invocation", "binary", "json", "oversized", "truncated"]))
    if kind == "invocation":
        return invocation(due_run, draw(st.none() | st.uuids().map(str)))
    if kind == "binary":
        return draw(st.binary(max_size=2000))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "oversized":
        return invocation(due_run) + b" " * draw(st.integers(LIMIT, 3 * LIMIT))
    full = invocation(due_run)
    return full[: draw(st.integers(0, len(full) - 1))]


@st.composite
def garbage(draw: st.DrawFn, done_run: str) -> bytes:
    """Bodies that get a valid signature but are no claim on a due run."""
    kind = draw(
        st.sampled_from(["binary", "json", "not-uuid", "finished", "unknown", "bad-fields"])
    )
    if kind == "binary":
        return draw(st.binary(max_size=2000))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "not-uuid":
        return json.dumps({"run_id": draw(json_values), "lease": None}).encode()
    if kind == "finished":
        return invocation(done_run, draw(st.none() | st.uuids().map(str)))
    if kind == "unknown":
        return invocation(str(draw(st.uuids())))
    fields = draw(st.dictionaries(st.sampled_from(["lease", "wait", "extra"]), json_values))
    return json.dumps({"run_id": done_run, **fields}).encode()


def b64(draw: st.DrawFn) -> str:
    return draw(st.text(st.sampled_from("ABCDEFGHabcdefgh0123456789-_"), min_size=0, max_size=50))


@st.composite
def bad_requests(
    draw: st.DrawFn, due_run: str, done_run: str
) -> tuple[str, bytes, dict[str, str], bool]:
    """(path, body, headers, validly signed?)"""
    path = draw(st.sampled_from([PATH, TICK_PATH]))
    now = int(time.time())
    signature = draw(
        st.sampled_from(
            [
                "missing",
                "random",
                "shaped",
                "other-body",
                "other-path",
                "other-method",
                "other-key",
                "expired",
                "future",
                "valid-garbage",
            ]
        )
    )
    headers: dict[str, str] = {}
    body = draw(bodies(due_run))
    valid = False
    if signature == "random":
        headers[SIGNATURE_HEADER] = draw(header_text)
    elif signature == "shaped":
        headers[SIGNATURE_HEADER] = f"{b64(draw)}.{b64(draw)}"
    elif signature == "other-body":
        signed_for = draw(st.binary(max_size=200))
        if signed_for == body:
            signed_for += b"!"
        headers.update(sign_request(KEY, method="POST", path=path, body=signed_for))
    elif signature == "other-path":
        other = TICK_PATH if path == PATH else PATH
        headers.update(sign_request(KEY, method="POST", path=other, body=body))
    elif signature == "other-method":
        headers.update(sign_request(KEY, method="PUT", path=path, body=body))
    elif signature == "other-key":
        key = draw(st.text(min_size=1, max_size=40).filter(lambda k: k.strip() and k != KEY))
        headers.update(sign_request(key, method="POST", path=path, body=body))
    elif signature == "expired":
        age = draw(st.integers(MAX_AGE_SECONDS + 2, 10**8))
        headers.update(sign_request(KEY, method="POST", path=path, body=body, timestamp=now - age))
    elif signature == "future":
        ahead = draw(st.integers(MAX_SKEW_SECONDS + 2, 10**8))
        headers.update(
            sign_request(KEY, method="POST", path=path, body=body, timestamp=now + ahead)
        )
    elif signature == "valid-garbage":
        path = PATH
        body = draw(garbage(done_run))
        headers.update(sign_request(KEY, method="POST", path=path, body=body))
        valid = True
    if path == TICK_PATH and draw(st.booleans()):
        scheme = draw(st.sampled_from(["Bearer", "bearer", "Basic"]))
        secret = draw(header_text.filter(lambda s: s != "the-cron-secret"))
        headers["Authorization"] = f"{scheme} {secret}".strip()
    headers.update(draw(st.dictionaries(header_names, header_text, max_size=3)))
    if draw(st.booleans()):
        headers["Content-Type"] = draw(st.sampled_from(["application/json", "text/plain", ""]))
    return path, body, headers, valid


# the tests ----------------------------------------------------------------------------
@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_generated_bad_requests_never_500_and_change_nothing(
    target: Target, data: st.DataObject
) -> None:
    path, body, headers, valid = data.draw(bad_requests(target.due_run, target.done_run))
    before = await snapshot(target.conn)
    target.tried += 1
    response = await target.http.post(path, content=body, headers=headers)
    assert response.status_code < 500, (response.status_code, response.text)
    answer = response.json()  # every answer is JSON, refusals included
    if len(body) > LIMIT:
        assert response.status_code == 413, answer
    elif not valid:
        assert response.status_code == 401, answer
    else:
        assert response.status_code in (200, 400, 404), answer
        if response.status_code == 200:
            assert answer["accepted"] is False, answer
    assert await snapshot(target.conn) == before, "a refused request changed the database"


async def test_control_a_signed_invocation_of_the_due_run_is_claimed(target: Target) -> None:
    """Without this, "nothing changed" above could mean the due run was never claimable."""
    body = invocation(target.due_run)
    headers = sign_request(KEY, method="POST", path=PATH, body=body)
    response = await target.http.post(PATH, content=body, headers=headers)
    assert response.status_code == 202, response.text
    assert await target.fk.result(target.due_run, timeout=20) == 2


async def raw_request(port: int, head: bytes, body: bytes, *, close_early: bool) -> bytes:
    """Send bytes a client library would not; return whatever the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        if close_early:
            writer.write_eof()  # the client hangs up mid-body
        # A server still waiting for the promised bytes answers nothing: fine.
        return await asyncio.wait_for(reader.read(65536), 10 if close_early else 2)
    except (ConnectionError, TimeoutError):
        return b""
    finally:
        writer.close()


@pytest.mark.parametrize(
    "case",
    [
        "short-body-then-hangup",
        "short-body-then-silence",
        "declared-too-large",
        "chunked-too-large",
    ],
)
async def test_truncated_and_lying_requests_change_nothing(target: Target, case: str) -> None:
    before = await snapshot(target.conn)
    port = int(target.http.base_url.port or 80)
    body = invocation(target.due_run)
    signed = sign_request(KEY, method="POST", path=PATH, body=body)
    head = f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n{SIGNATURE_HEADER}: {signed[SIGNATURE_HEADER]}\r\n"
    if case.startswith("short-body"):
        wire = (head + f"Content-Length: {len(body)}\r\n\r\n").encode(), body[: len(body) // 2]
        answer = await raw_request(port, *wire, close_early=case.endswith("hangup"))
    elif case == "declared-too-large":
        wire = (head + f"Content-Length: {LIMIT * 100}\r\n\r\n").encode(), body
        answer = await raw_request(port, *wire, close_early=False)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    else:
        chunk = b" " * 1000
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // 1000 + 2))
        wire = (head + "Transfer-Encoding: chunked\r\n\r\n").encode(), chunks + b"0\r\n\r\n"
        answer = await raw_request(port, *wire, close_early=False)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    target.tried += 1
    assert b" 500 " not in answer.split(b"\r\n", 1)[0], answer[:200]
    await asyncio.sleep(0.2)  # anything the server might still do, it does now
    assert await snapshot(target.conn) == before
    # The server is still healthy for the next request.
    assert (await target.http.get(PATH)).status_code == 200
