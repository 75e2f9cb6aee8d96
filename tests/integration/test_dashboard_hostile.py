"""Hostile requests to the dashboard over a real uvicorn: malformed filters, paths,
headers and action bodies get a 4xx with a JSON error (or the page with the
error on it), never a 500 or a 503; the sign-in throttle holds under
concurrency; signing out ends a session on the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowkeeper import Context, FlowKeeper, NonRetriableError
from flowkeeper.dashboard import auth

from ..helpers import Served, drive, make_fk
from .hostile import LogWatch, Raw, raw_request

PASSWORD = "correct horse battery staple"
UI = "/api/flowkeeper/ui"
# No fuzzed workflow name will ever be this, so "replay every failed run" of a
# random name cannot touch the runs under test.
WORKFLOW = "checkout-9f3c2a7e"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[LogWatch]:
    caplog.set_level(logging.INFO)
    watch = LogWatch(caplog)
    yield watch
    watch.detach()


@dataclass
class Dash:
    fk: FlowKeeper
    port: int
    cookie: str
    csrf: str
    failed: str
    completed: str

    @property
    def session_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"cookie", f"{auth.COOKIE}={self.cookie}".encode())]

    @property
    def action_headers(self) -> list[tuple[bytes, bytes]]:
        return [
            *self.session_headers,
            (b"x-csrf-token", self.csrf.encode()),
            (b"content-type", b"application/json"),
        ]


def _client(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}",
        limits=httpx.Limits(max_connections=400, max_keepalive_connections=0),
        timeout=60,
    )


async def _login(client: httpx.AsyncClient, password: str = PASSWORD) -> httpx.Response:
    return await client.post(
        f"{UI}/login", data={"password": password, "next": f"{UI}/"}, follow_redirects=False
    )


async def _csrf(client: httpx.AsyncClient) -> str:
    page = await client.get(f"{UI}/")
    match = re.search(r'<meta name="fk-csrf" content="([^"]+)">', page.text)
    assert match, page.text[:300]
    return match.group(1)


@pytest.fixture
async def dash(database_url: str, logs: LogWatch) -> AsyncIterator[Dash]:
    fk = make_fk(database_url, dashboard_password=PASSWORD)

    def boom() -> None:
        raise NonRetriableError("declined")

    @fk.workflow(WORKFLOW)
    async def checkout(ctx: Context, n: int) -> int:
        await ctx.step("reserve", lambda: n)
        if n < 0:
            await ctx.step("charge", boom)
        return n

    served = Served(fk.asgi(), fk.test_port)  # type: ignore[attr-defined]
    logs.attach()
    try:
        async with served:
            failed = (await fk.trigger(WORKFLOW, -1)).run_id
            completed = (await fk.trigger(WORKFLOW, 1)).run_id
            await drive(fk, [failed, completed])
            async with _client(fk.test_port) as client:  # type: ignore[attr-defined]
                assert (await _login(client)).status_code == 303
                csrf = await _csrf(client)
                cookie = client.cookies[auth.COOKIE]
            yield Dash(fk, fk.test_port, cookie, csrf, failed, completed)  # type: ignore[attr-defined]
    finally:
        await fk.aclose()


async def _snapshot(conn: asyncpg.Connection) -> list[tuple[object, ...]]:
    rows = await conn.fetch(
        "SELECT id, status, due_at, lease_token, invocations, updated_at, "
        "(SELECT count(*) FROM flowkeeper.steps s WHERE s.run_id = r.id), "
        "(SELECT count(*) FROM flowkeeper.events e WHERE e.run_id = r.id) "
        "FROM flowkeeper.runs r ORDER BY id"
    )
    return [tuple(r) for r in rows]


def _assert_json_refusal(response: Raw) -> None:
    assert 400 <= response.status < 500, (response.status, response.body[:300])
    assert response.headers.get("content-type", "").startswith("application/json"), (
        response.status,
        response.body[:300],
    )
    error = response.json()["error"]
    assert error["code"] and error["message"], error


def _assert_no_5xx(response: Raw) -> None:
    assert response.status < 500, (response.status, response.body[:300])
    if response.status >= 400 and response.headers.get("content-type", "").startswith(
        "application/json"
    ):
        _assert_json_refusal(response)


# the cases seen in the issue --------------------------------------------------------

HOSTILE_QUERIES = [
    "since=99999999999999999999d",
    "until=99999999999999999999w",
    "since=1" + "0" * 400 + "s",
    "since=0001-01-01T00:00:00",
    "until=9999-12-31T23:59:59%2B14:00",
    "since=-5d",
    "workflow=a%00b",
    "q=%00",
    "q=" + "%ED%A0%80",
    "workflow=%ED%A0%80",
    "status=%00",
    "before=%00",
    "limit=-1",
    "limit=99999999999999999999",
    "limit=" + "9" * 5000,
    "workflow=" + "w" * 5000,
    "q=" + "k" * 5000,
]


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
async def test_hostile_filters_are_400_not_500_or_503(
    dash: Dash,
    conn: asyncpg.Connection,
    logs: LogWatch,
    query: str,
) -> None:
    logs.clear()
    api = await asyncio.to_thread(
        raw_request, dash.port, "GET", f"{UI}/api/runs?{query}", dash.session_headers
    )
    _assert_no_5xx(api)
    page = await asyncio.to_thread(
        raw_request, dash.port, "GET", f"{UI}/?{query}", dash.session_headers
    )
    assert page.status < 500, (page.status, page.body[:300])
    if api.status >= 400:
        _assert_json_refusal(api)
        assert page.status == api.status
        assert api.json()["error"]["message"] in json.loads(
            re.search(rb'id="fk-data">(.*?)</script>', page.body, re.S).group(1)  # type: ignore[union-attr]
        )["error"].replace("\\u003c", "<")
        assert len(logs.warnings()) == 2, [r.getMessage() for r in logs.warnings()]
    logs.assert_clean()


@pytest.mark.parametrize(
    "body",
    [
        b'{"reason": "a\\u0000b"}',
        b'{"reason": "\\ud800"}',
        b'{"from_step": "\\udfff"}',
        b'{"from_step": "\\u0000"}',
        b'{"reason": "\xed\xa0\x80"}',
        b"[" * 5000 + b"]" * 5000,
        b'{"reason": 1e999}',
        b'{"reason": NaN}',
        b'{"reason": ' + b"9" * 5000 + b"}",
        b"\xff",
    ],
)
@pytest.mark.parametrize("action", ["replay", "retry", "cancel", "replay-failed"])
async def test_hostile_action_bodies_are_400(
    dash: Dash,
    conn: asyncpg.Connection,
    logs: LogWatch,
    body: bytes,
    action: str,
) -> None:
    before = await _snapshot(conn)
    if action == "replay-failed":
        body = body.replace(b'"reason"', b'"workflow"').replace(b'"from_step"', b'"workflow"')
        path = f"{UI}/api/replay-failed"
    else:
        path = f"{UI}/api/runs/{dash.failed}/{action}"
    logs.clear()
    response = await asyncio.to_thread(
        raw_request, dash.port, "POST", path, dash.action_headers, body
    )
    _assert_json_refusal(response)
    assert response.status == 400
    logs.assert_clean()
    assert len(logs.warnings()) == 1, [r.getMessage() for r in logs.warnings()]
    assert await _snapshot(conn) == before


@pytest.mark.parametrize(
    "path",
    [
        "/runs/%00",
        "/runs/%ED%A0%80",
        "/api/runs/%00",
        "/api/runs/" + "9" * 3000,
        "/api/runs/%ED%A0%80",
        "/api/runs/%00/cancel",
        "/api/runs/00000000-0000-0000-0000-000000000000%00/cancel",
    ],
)
async def test_hostile_run_ids_in_the_path_are_404(
    dash: Dash,
    conn: asyncpg.Connection,
    logs: LogWatch,
    path: str,
) -> None:
    before = await _snapshot(conn)
    logs.clear()
    method = "POST" if path.endswith("/cancel") else "GET"
    headers = dash.action_headers if method == "POST" else dash.session_headers
    response = await asyncio.to_thread(raw_request, dash.port, method, UI + path, headers, b"{}")
    assert response.status == 404, (response.status, response.body[:300])
    logs.assert_clean()
    assert await _snapshot(conn) == before


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"origin", b"http://["),
        (b"origin", b"http://\xff\xfe"),
        (b"host", b"["),
        (b"host", b"\xff"),
        (b"x-forwarded-proto", b"\xff"),
        (b"x-forwarded-host", b"[::1"),
        (b"cookie", f"{auth.COOKIE}=\xff\xfe.x.y".encode("latin-1")),
        (b"x-csrf-token", b"\xff\xfe"),
    ],
)
@pytest.mark.parametrize("route", ["login", "logout", "action", "page", "api"])
async def test_hostile_headers_never_500(
    dash: Dash,
    conn: asyncpg.Connection,
    logs: LogWatch,
    name: bytes,
    value: bytes,
    route: str,
) -> None:
    before = await _snapshot(conn)
    headers = [h for h in dash.action_headers if h[0] != name] + [(name, value)]
    if name == b"host":
        headers = [(name, value), *headers]
    method, path, body = {
        "login": ("POST", f"{UI}/login", b"password=wrong"),
        "logout": ("POST", f"{UI}/logout", b""),
        "action": ("POST", f"{UI}/api/runs/{dash.completed}/retry", b"{}"),
        "page": ("GET", f"{UI}/?status=failed", b""),
        "api": ("GET", f"{UI}/api/runs", b""),
    }[route]
    logs.clear()
    response = await asyncio.to_thread(raw_request, dash.port, method, path, headers, body)
    assert response.status < 500, (response.status, response.body[:300])
    logs.assert_clean()
    if route != "logout":
        assert await _snapshot(conn) == before


# fuzzing ------------------------------------------------------------------------------

_PARAMS = ["workflow", "status", "since", "until", "q", "before", "limit", "next"]
_values = st.one_of(
    st.text(max_size=30),
    st.integers().map(str),
    st.integers(min_value=-(10**40), max_value=10**40).map(lambda n: f"{n}d"),
    st.floats().map(str),
    st.sampled_from(["%00", "%ED%A0%80", "%FF", "%", "%%", "1e999", "-0", "NaN", "∞"]),
    st.binary(max_size=20).map(lambda b: quote(b, safe="")),
)
_query = st.lists(st.tuples(st.sampled_from(_PARAMS), _values), max_size=5).map(
    lambda pairs: "&".join(f"{k}={v if v.startswith('%') else quote(v)}" for k, v in pairs)
)
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
_action_body = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"reason": _json, "from_step": _json, "workflow": _json}
    ).map(lambda d: json.dumps(d).encode()),
    _json.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=50),
    st.integers(min_value=1, max_value=4000).map(lambda n: b"[" * n + b"]" * n),
)


async def test_fuzz_every_route(
    dash: Dash,
    conn: asyncpg.Connection,
    logs: LogWatch,
) -> None:
    before = await _snapshot(conn)
    ghost = str(uuid.uuid4())

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(
        route=st.sampled_from(
            [
                "GET /",
                "GET /api/runs",
                "GET /runs/{id}",
                "GET /api/runs/{id}",
                "POST /api/runs/{id}/replay",
                "POST /api/runs/{id}/retry",
                "POST /api/runs/{id}/cancel",
                "POST /api/runs/{id}/{junk}",
                "POST /api/replay-failed",
                "GET /login",
            ]
        ),
        query=_query,
        body=_action_body,
        run_id=st.one_of(
            st.just(ghost),
            st.text(max_size=40).map(lambda t: quote(t, safe="")),
            st.sampled_from(["%00", "%ED%A0%80", "-1", "9" * 50]),
        ),
        junk=st.text(min_size=1, max_size=10).map(lambda t: quote(t, safe="")),
    )
    def check(route: str, query: str, body: bytes, run_id: str, junk: str) -> None:
        method, path = route.split(" ")
        path = UI + path.replace("{id}", run_id).replace("{junk}", junk)
        if query:
            path += "?" + query
        headers = dash.action_headers if method == "POST" else dash.session_headers
        response = raw_request(dash.port, method, path, headers, body if method == "POST" else b"")
        _assert_no_5xx(response)
        if path.split("?")[0].startswith(f"{UI}/api/") and response.status >= 400:
            _assert_json_refusal(response)

    logs.clear()
    await asyncio.to_thread(check)
    logs.assert_clean()
    assert await _snapshot(conn) == before


# sign-in throttle and server-side sessions ----------------------------------------------


async def test_concurrent_guesses_cannot_beat_the_throttle(
    dash: Dash,
    conn: asyncpg.Connection,
    logs: LogWatch,
) -> None:
    guesses = 250
    async with _client(dash.port) as client:
        wrong = await asyncio.gather(*(_login(client, f"guess-{i}") for i in range(guesses)))
        # The right password, after the limit was spent: refused without being looked at.
        right = await _login(client)
    statuses = [r.status_code for r in wrong]
    evaluated = statuses.count(401)
    assert evaluated <= auth.MAX_FAILURES, statuses
    assert evaluated + statuses.count(429) == guesses, statuses
    assert right.status_code == 429, right.text[:200]
    assert auth.COOKIE not in right.headers.get("set-cookie", "")
    counted = await conn.fetchval(
        "SELECT failures FROM flowkeeper.login_failures WHERE client = '127.0.0.1'"
    )
    assert counted == guesses + 1
    logs.assert_clean()


async def test_logout_ends_the_session_on_the_server(dash: Dash, conn: asyncpg.Connection) -> None:
    async with _client(dash.port) as client:
        assert (await _login(client)).status_code == 303
        captured = client.cookies[auth.COOKIE]
        csrf = await _csrf(client)
        assert (await client.get(f"{UI}/api/runs")).status_code == 200
        out = await client.post(f"{UI}/logout", data={"csrf": csrf}, follow_redirects=False)
        assert out.status_code == 303
    sessions_left = await conn.fetchval("SELECT count(*) FROM flowkeeper.dashboard_sessions")
    # The captured cookie, replayed by someone else after the logout: signed in no more.
    async with _client(dash.port) as thief:
        thief.cookies.set(auth.COOKIE, captured, path=UI)
        api = await thief.get(f"{UI}/api/runs")
        assert api.status_code == 401 and api.json()["error"]["code"] == "not_signed_in"
        page = await thief.get(f"{UI}/", follow_redirects=False)
        assert page.status_code == 303 and "/login" in page.headers["location"]
        action = await thief.post(
            f"{UI}/api/runs/{dash.failed}/retry", json={}, headers={"x-csrf-token": csrf}
        )
        assert action.status_code == 401
    # The fixture's own session is untouched: logout ends that one session only.
    assert sessions_left == 1
    async with _client(dash.port) as other:
        other.cookies.set(auth.COOKIE, dash.cookie, path=UI)
        assert (await other.get(f"{UI}/api/runs")).status_code == 200


async def test_sessions_are_one_row_each_and_expire_on_the_server(
    dash: Dash, conn: asyncpg.Connection
) -> None:
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.dashboard_sessions") == 1
    await conn.execute(
        "UPDATE flowkeeper.dashboard_sessions SET expires_at = now() - interval '1 second'"
    )
    async with _client(dash.port) as client:
        client.cookies.set(auth.COOKIE, dash.cookie, path=UI)
        assert (await client.get(f"{UI}/api/runs")).status_code == 401
        # A new sign-in sweeps the expired row away.
        assert (await _login(client)).status_code == 303
    assert await conn.fetchval("SELECT count(*) FROM flowkeeper.dashboard_sessions") == 1
