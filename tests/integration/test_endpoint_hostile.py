"""Hostile requests to the endpoint, over a real uvicorn: always a 4xx with a JSON
error that says what was wrong, one WARNING line in the log, no traceback, and
no run touched.

Some of these bytes cannot be sent with httpx (non-ASCII header values), so
requests go over a raw socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowkeeper import Context, FlowKeeper
from flowkeeper.boundary import MAX_JSON_DEPTH
from flowkeeper.signing import SIGNATURE_HEADER, sign_request

from ..helpers import KEY, Served, make_fk
from .hostile import LogWatch, Raw, raw_request

PATH = "/api/flowkeeper/"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[LogWatch]:
    caplog.set_level(logging.INFO)
    watch = LogWatch(caplog)
    yield watch
    watch.detach()


@dataclass
class Env:
    fk: FlowKeeper
    port: int
    queued: str
    completed: str


async def _snapshot(conn: asyncpg.Connection, ids: list[str]) -> list[tuple[object, ...]]:
    rows = await conn.fetch(
        "SELECT id, status, due_at, lease_token, invocations, updated_at, input::text, "
        "(SELECT count(*) FROM flowkeeper.steps s WHERE s.run_id = r.id) "
        "FROM flowkeeper.runs r WHERE id = ANY($1::uuid[]) ORDER BY id",
        [uuid.UUID(i) for i in ids],
    )
    return [tuple(r) for r in rows]


@pytest.fixture
async def env(database_url: str, logs: LogWatch) -> AsyncIterator[Env]:
    fk = make_fk(database_url)

    @fk.workflow("w")
    async def w(ctx: Context, n: int) -> int:
        return await ctx.step("double", lambda: n * 2)

    queued = (await fk.trigger("w", 1)).run_id  # no server yet: left queued
    done = (await fk.trigger("w", 2)).run_id
    await fk.advance(done)
    served = Served(fk.asgi(), fk.test_port)  # type: ignore[attr-defined]
    logs.attach()  # after uvicorn configured its loggers
    try:
        async with served:
            yield Env(fk, fk.test_port, queued, done)  # type: ignore[attr-defined]
    finally:
        await fk.aclose()


def _signed_headers(body: bytes, path: str = PATH) -> list[tuple[bytes, bytes]]:
    sig = sign_request(KEY, method="POST", path=path, body=body)[SIGNATURE_HEADER]
    return [
        (SIGNATURE_HEADER.encode(), sig.encode()),
        (b"content-type", b"application/json"),
    ]


def _assert_refusal(response: Raw, status: int | None = None) -> dict[str, Any]:
    assert 400 <= response.status < 500, (response.status, response.body[:300])
    if status is not None:
        assert response.status == status, response.body[:300]
    assert response.headers.get("content-type", "").startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "value",
    [
        b"\xff\xfe.abc",
        b"aGVsbG8.\xe9t\xe9",
        "arE7gA.tiMdSqFzKWh9wZWCYXvrTeHfEbs15vOLc33OVdh2WK\u00e9".encode("latin-1"),
        b"\x80",
        b"a.b.c",
        b"..",
        b"=.=",
        b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.x",
    ],
)
async def test_bad_signature_header_bytes_are_401_with_one_warning(
    env: Env, conn: asyncpg.Connection, logs: LogWatch, value: bytes
) -> None:
    body = json.dumps({"run_id": env.queued, "lease": None}).encode()
    before = await _snapshot(conn, [env.queued, env.completed])
    logs.clear()
    response = await asyncio.to_thread(
        raw_request, env.port, "POST", PATH, [(SIGNATURE_HEADER.encode(), value)], body
    )
    error = _assert_refusal(response, 401)
    assert error["code"] in ("malformed_signature", "invalid_signature")
    logs.assert_clean()
    assert len(logs.warnings()) == 1, [r.getMessage() for r in logs.warnings()]
    assert await _snapshot(conn, [env.queued, env.completed]) == before


async def test_non_ascii_bearer_token_on_tick_is_401(env: Env, logs: LogWatch) -> None:
    logs.clear()
    response = await asyncio.to_thread(
        raw_request, env.port, "GET", PATH + "tick", [(b"authorization", b"Bearer \xff\xfe")]
    )
    _assert_refusal(response, 401)
    logs.assert_clean()


def _nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1_000, 20_000])
@pytest.mark.parametrize("where", ["body", "run_id", "input"])
async def test_deeply_nested_signed_body_is_400(
    env: Env, conn: asyncpg.Connection, logs: LogWatch, depth: int, where: str
) -> None:
    run_id = str(uuid.uuid4())
    if where == "body":
        body = _nested(depth)
    elif where == "run_id":
        body = b'{"run_id": ' + _nested(depth) + b"}"
    else:
        body = (
            b'{"run_id": "' + run_id.encode() + b'", "lease": null, "create": '
            b'{"workflow": "w", "idempotency_key": null, "input": ' + _nested(depth) + b"}}"
        )
    before = await _snapshot(conn, [env.queued, env.completed])
    logs.clear()
    response = await asyncio.to_thread(
        raw_request, env.port, "POST", PATH, _signed_headers(body), body
    )
    error = _assert_refusal(response, 400)
    assert (
        "nest" in error["message"]
        or "JSON object" in error["message"]
        or "run_id" in (error["message"])
    )
    logs.assert_clean()
    assert len(logs.warnings()) == 1
    assert await _snapshot(conn, [env.queued, env.completed]) == before
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == 2


@pytest.mark.parametrize(
    ("create", "says"),
    [
        ({"workflow": "w\u0000x", "input": 1}, "workflow"),
        ({"workflow": "w", "input": 1, "idempotency_key": "k\u0000"}, "idempotency_key"),
        ({"workflow": "w", "input": 1, "idempotency_key": "k\ud800"}, "idempotency_key"),
        ({"workflow": "\ud800", "input": 1}, "workflow"),
        ({"workflow": "w", "input": "a\u0000b"}, "input"),
        ({"workflow": "w", "input": {"k\u0000": 1}}, "input"),
        ({"workflow": "w", "input": ["\udfff"]}, "input"),
        ({"workflow": "w" * 10_000, "input": 1}, "workflow"),
        ({"workflow": "w", "input": 1, "idempotency_key": "k" * 20_000}, "idempotency_key"),
    ],
)
async def test_text_postgres_cannot_store_is_400_not_503(
    env: Env, conn: asyncpg.Connection, logs: LogWatch, create: dict[str, Any], says: str
) -> None:
    body = json.dumps({"run_id": str(uuid.uuid4()), "lease": None, "create": create}).encode()
    logs.clear()
    response = await asyncio.to_thread(
        raw_request, env.port, "POST", PATH, _signed_headers(body), body
    )
    error = _assert_refusal(response, 400)
    assert says in error["message"]
    logs.assert_clean()
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == 2


@pytest.mark.parametrize(
    "body",
    [
        b'{"run_id": "%s", "lease": null, "create": {"workflow": "w", "input": NaN}}',
        b'{"run_id": "%s", "lease": null, "create": {"workflow": "w", "input": Infinity}}',
        b'{"run_id": "%s", "lease": null, "create": {"workflow": "w", "input": 1e999}}',
        b'{"run_id": "%s", "lease": null, "create": {"workflow": "w", "input": -1e999}}',
        b'{"run_id": "%s", "lease": null, "create": {"workflow": "w", "input": 1'
        + b"0" * 5000
        + b"}}",
        b'{"run_id": "%s", "lease": null, "create": {"workflow": "w", "input": "\xed\xa0\x80"}}',
        b'{"run_id": "%s", "lease": null, "create": {"workflow": "w", "input": "\xff"}}',
        b'{"run_id": "%s", "lease": null, "create": {"workflow": "w", "input": "\x00"}}',
    ],
)
async def test_absurd_json_values_are_400(
    env: Env, conn: asyncpg.Connection, logs: LogWatch, body: bytes
) -> None:
    body = body.replace(b"%s", str(uuid.uuid4()).encode())
    logs.clear()
    response = await asyncio.to_thread(
        raw_request, env.port, "POST", PATH, _signed_headers(body), body
    )
    _assert_refusal(response, 400)
    logs.assert_clean()
    assert len(logs.warnings()) == 1
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.runs") == 2


# fuzzing --------------------------------------------------------------------------------

_header_bytes = st.binary(max_size=120).map(
    # What HTTP lets through to the app (uvicorn answers anything else itself): no
    # control characters but tab, no surrounding whitespace; any byte over 0x7f.
    lambda b: bytes(c for c in b if (c >= 0x20 and c != 0x7F) or c == 0x09).strip(b" \t")
)

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _body_strategy(run_ids: list[str]) -> st.SearchStrategy[bytes]:
    run_id = st.one_of(st.sampled_from(run_ids), st.uuids().map(str), _json, st.text(max_size=40))
    create = st.fixed_dictionaries(
        {},
        optional={
            "workflow": st.one_of(st.sampled_from(["w", "nope"]), st.text(max_size=30), _json),
            "input": _json,
            "idempotency_key": st.one_of(st.none(), st.text(max_size=30), _json),
        },
    )
    invocation = st.fixed_dictionaries(
        {"run_id": run_id},
        optional={
            "lease": st.one_of(st.none(), st.uuids().map(str), _json),
            "wait": st.one_of(st.booleans(), _json),
            "create": st.one_of(create, _json),
        },
    ).map(lambda d: json.dumps(d, allow_nan=True).encode())
    depth = st.integers(min_value=1, max_value=3000).map(lambda n: _nested(n))
    return st.one_of(
        invocation,
        depth,
        st.binary(max_size=200),
        _json.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    )


async def test_fuzz_signature_headers_and_signed_bodies(
    env: Env, conn: asyncpg.Connection, logs: LogWatch
) -> None:
    existing = [env.queued, env.completed]
    before = await _snapshot(conn, existing)

    # Signed bodies may name the completed run (its claim is refused) or new ids (a
    # valid signed create makes a new run: allowed); ticks go unsigned, since a
    # signed tick would rightly dispatch the queued run.
    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(
        header=st.one_of(_header_bytes, st.none()),
        body=_body_strategy([env.completed]),
        path=st.sampled_from([PATH, PATH + "tick"]),
        sign=st.booleans(),
    )
    def check(header: bytes | None, body: bytes, path: str, sign: bool) -> None:
        sign = sign and path == PATH
        headers = _signed_headers(body, path) if sign else []
        if header is not None and not sign:
            headers.append((SIGNATURE_HEADER.encode(), header))
        response = raw_request(env.port, "POST", path, headers, body)
        assert response.status < 500, (response.status, response.body[:300], body[:200])
        if response.status >= 400:
            _assert_refusal(response)

    logs.clear()
    await asyncio.to_thread(check)
    logs.assert_clean()
    assert await _snapshot(conn, existing) == before
