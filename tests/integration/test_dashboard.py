"""The dashboard over real HTTP: off without a password, sign-in, sessions, CSRF, API."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from flowkeeper import Context, FlowKeeper, NonRetriableError
from flowkeeper.dashboard import auth

from ..helpers import KEY, drive, make_fk, serve

PASSWORD = "correct horse battery staple"
UI = "/api/flowkeeper/ui"


def _workflows(fk: FlowKeeper) -> None:
    def boom() -> None:
        raise NonRetriableError("<script>alert(1)</script> declined")

    @fk.workflow("checkout")
    async def checkout(ctx: Context, n: int) -> int:
        await ctx.step("reserve", lambda: n)
        await ctx.step("charge", boom)
        return n


@pytest.fixture
async def dash(database_url: str) -> AsyncIterator[FlowKeeper]:
    fk = make_fk(database_url, dashboard_password=PASSWORD)
    _workflows(fk)
    try:
        async with serve(fk):
            yield fk
    finally:
        await fk.aclose()


def _client(fk: FlowKeeper) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{fk.test_port}")  # type: ignore[attr-defined]


async def _login(client: httpx.AsyncClient, password: str = PASSWORD) -> httpx.Response:
    return await client.post(
        f"{UI}/login", data={"password": password, "next": f"{UI}/"}, follow_redirects=False
    )


def _page_data(html: str) -> Any:
    match = re.search(r'<script type="application/json" id="fk-data">(.*?)</script>', html, re.S)
    assert match, "no data block"
    return json.loads(match.group(1))


def _csrf(html: str) -> str:
    match = re.search(r'<meta name="fk-csrf" content="([^"]+)">', html)
    assert match
    return match.group(1)


async def test_off_without_a_password_and_says_so(database_url: str) -> None:
    fk = make_fk(database_url)
    try:
        async with serve(fk), _client(fk) as client:
            page = await client.get(f"{UI}/")
            assert page.status_code == 403
            assert "The dashboard is off" in page.text
            assert "FLOWKEEPER_DASHBOARD_PASSWORD" in page.text
            api = await client.get(f"{UI}/api/runs")
            assert api.status_code == 403
            assert api.json()["error"]["code"] == "dashboard_off"
            login = await client.post(f"{UI}/login", data={"password": ""})
            assert login.status_code == 403
    finally:
        await fk.aclose()


async def test_dashboard_path_none_removes_it(database_url: str) -> None:
    fk = make_fk(database_url, dashboard_password=PASSWORD, dashboard_path=None)
    try:
        async with serve(fk), _client(fk) as client:
            assert (await client.get(f"{UI}/")).status_code == 404
            assert (await client.get("/api/flowkeeper/")).status_code == 200
    finally:
        await fk.aclose()


async def test_pages_and_api_need_a_session(dash: FlowKeeper) -> None:
    async with _client(dash) as client:
        page = await client.get(f"{UI}/runs/x?a=1")
        assert page.status_code == 303
        assert (
            page.headers["location"]
            == f"{UI}/login?next=%2Fapi%2Fflowkeeper%2Fui%2Fruns%2Fx%3Fa%3D1"
        )
        assert (await client.get(f"{UI}/api/runs")).status_code == 401
        form = await client.get(f"{UI}/login")
        assert form.status_code == 200 and 'name="password"' in form.text
        # Static assets are public code (the login page needs them).
        css = await client.get(f"{UI}/static/app.css")
        assert css.status_code == 200 and "--failed" in css.text


async def test_login_sets_a_strict_cookie_and_opens_the_pages(dash: FlowKeeper) -> None:
    run_id = (await dash.trigger("checkout", 3)).run_id
    await drive(dash, [run_id])
    async with _client(dash) as client:
        response = await _login(client)
        assert response.status_code == 303
        assert response.headers["location"] == f"{UI}/"
        cookie = response.headers["set-cookie"]
        assert cookie.startswith(f"{auth.COOKIE}=")
        for attribute in ("HttpOnly", "SameSite=lax", f"Path={UI}", "Max-Age=43200"):
            assert attribute in cookie, attribute
        assert "Secure" not in cookie  # plain http here; set behind https

        page = await client.get(f"{UI}/")
        assert page.status_code == 200
        data = _page_data(page.text)
        assert [r["id"] for r in data["runs"]] == [run_id]
        assert data["counts"] == {"failed": 1}
        assert data["workflows"] == ["checkout"]
        # Headers that keep the page from being framed or running foreign scripts.
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["cache-control"] == "no-store"
        # Data from runs never reaches the HTML unescaped.
        run_page = await client.get(f"{UI}/runs/{run_id}")
        assert run_page.status_code == 200
        assert "<script>alert" not in run_page.text
        detail = _page_data(run_page.text)
        assert detail["status"] == "failed"
        assert detail["error"]["message"].startswith("<script>alert(1)</script>")
        assert [lane["key"] for lane in detail["timeline"]["lanes"]] == ["reserve", "charge"]
        charge = detail["timeline"]["lanes"][1]["spans"]
        assert [(s["kind"], s["outcome"]) for s in charge] == [("attempt", "failed")]

        api = await client.get(f"{UI}/api/runs", params={"status": "failed"})
        assert [r["id"] for r in api.json()["runs"]] == [run_id]
        bad = await client.get(f"{UI}/api/runs", params={"status": "nope"})
        assert bad.status_code == 400 and "Unknown run status" in bad.json()["error"]["message"]
        missing = await client.get(f"{UI}/runs/not-a-run")
        assert missing.status_code == 404


async def test_wrong_password_is_refused_slowly_then_throttled(
    dash: FlowKeeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _client(dash) as client:
        started = asyncio.get_running_loop().time()
        wrong = await _login(client, "guess")
        assert asyncio.get_running_loop().time() - started >= auth.FAILURE_DELAY
        assert wrong.status_code == 401 and "Wrong password" in wrong.text
        assert auth.COOKIE not in wrong.headers.get("set-cookie", "")
        monkeypatch.setattr(auth, "FAILURE_DELAY", 0)
        for _ in range(auth.MAX_FAILURES - 1):
            assert (await _login(client, "guess")).status_code == 401
        # Over the limit: even the right password waits for the window to pass.
        throttled = await _login(client)
        assert throttled.status_code == 429 and "Too many failed sign-ins" in throttled.text
        assert (await client.get(f"{UI}/api/runs")).status_code == 401


async def test_forged_expired_and_old_password_cookies_are_refused(
    dash: FlowKeeper, database_url: str
) -> None:
    async with _client(dash) as client:
        await _login(client)
        value = client.cookies[auth.COOKIE]
        assert (await client.get(f"{UI}/api/runs")).status_code == 200

    async def status_with(cookie: str) -> int:
        async with _client(dash) as other:
            other.cookies.set(auth.COOKIE, cookie, path=UI)
            return (await other.get(f"{UI}/api/runs")).status_code

    payload, _, signature = value.rpartition(".")
    assert await status_with(f"{payload}.{signature[:-2]}xx") == 401  # tampered
    # Signed by someone who knows the password but not the signing key.
    outsider = FlowKeeper(
        database_url,
        signing_key="another-key-of-at-least-32-characters",
        dashboard_password=PASSWORD,
    )
    try:
        payload_data = auth.Auth(dash)._serializer.loads(value)  # type: ignore[union-attr]
        forged = auth.Auth(outsider)._serializer.dumps(payload_data)  # type: ignore[union-attr]
    finally:
        await outsider.aclose()
    assert await status_with(str(forged)) == 401
    # The password changed: every session ends.
    rotated = FlowKeeper(database_url, signing_key=KEY, dashboard_password="a new long password")
    try:
        assert await auth.Auth(rotated).session(_request_with(value)) is None
        assert await auth.Auth(dash).session(_request_with(value)) is not None
    finally:
        await rotated.aclose()


def _request_with(cookie: str) -> Any:
    from starlette.requests import Request

    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/",
            "headers": [(b"cookie", f"{auth.COOKIE}={cookie}".encode())],
        }
    )


async def test_sessions_expire(dash: FlowKeeper) -> None:
    serializer = auth.Auth(dash)._serializer
    assert serializer is not None
    async with _client(dash) as client:
        await _login(client)
        session = serializer.loads(client.cookies[auth.COOKIE])  # a real, recorded session

    def cookie(age: timedelta) -> str:
        signer = serializer.make_signer(serializer.salt)
        signer.get_timestamp = lambda: int(time.time() - age.total_seconds())  # type: ignore[method-assign]
        return signer.sign(serializer.dump_payload(session)).decode()

    async def status_with(value: str) -> int:
        async with _client(dash) as client:
            client.cookies.set(auth.COOKIE, value, path=UI)
            return (await client.get(f"{UI}/api/runs")).status_code

    assert await status_with(cookie(timedelta(hours=11, minutes=59))) == 200
    assert await status_with(cookie(timedelta(hours=12, seconds=2))) == 401  # 12 h by default


async def test_actions_need_the_csrf_token_and_the_same_origin(dash: FlowKeeper) -> None:
    run_id = (await dash.trigger("checkout", 1)).run_id
    await drive(dash, [run_id])
    async with _client(dash) as client:
        await _login(client)
        token = _csrf((await client.get(f"{UI}/")).text)
        url = f"{UI}/api/runs/{run_id}/replay"
        body = {"from_step": "reserve"}
        missing = await client.post(url, json=body)
        assert missing.status_code == 403 and missing.json()["error"]["code"] == "csrf"
        wrong = await client.post(url, json=body, headers={"X-CSRF-Token": token[:-1] + "x"})
        assert wrong.status_code == 403
        cross = await client.post(
            url, json=body, headers={"X-CSRF-Token": token, "Origin": "https://evil.example"}
        )
        assert cross.status_code == 403 and cross.json()["error"]["code"] == "cross_origin"
        assert (await dash.get_run(run_id)).status == "failed"  # nothing happened

        ok = await client.post(url, json=body, headers={"X-CSRF-Token": token})
        assert ok.status_code == 200, ok.text
        assert ok.json()["message"] == "Replaying from step 'reserve'."
        await drive(dash, [run_id])
        info = await dash.get_run(run_id)
        event = next(e for e in info.events if e.kind == "replayed")
        assert (event.detail or {})["by"] == "dashboard"

        again = await client.post(
            f"{UI}/api/runs/{run_id}/cancel", json={}, headers={"X-CSRF-Token": token}
        )
        assert again.status_code == 409 and "already finished" in again.json()["error"]["message"]
        unknown = await client.post(
            f"{UI}/api/runs/{run_id}/explode", json={}, headers={"X-CSRF-Token": token}
        )
        assert unknown.status_code == 404
        bulk = await client.post(
            f"{UI}/api/replay-failed",
            json={"workflow": "checkout"},
            headers={"X-CSRF-Token": token},
        )
        assert bulk.json()["replayed"] == [run_id]

        # Logging out needs the token too, then the session is gone.
        assert (await client.post(f"{UI}/logout", data={})).status_code == 403
        out = await client.post(f"{UI}/logout", data={"csrf": token}, follow_redirects=False)
        assert out.status_code == 303
        assert (await client.get(f"{UI}/api/runs")).status_code == 401


async def test_run_api_answers_304_while_nothing_changed(dash: FlowKeeper) -> None:
    run_id = (await dash.trigger("checkout", 2)).run_id
    await drive(dash, [run_id])
    async with _client(dash) as client:
        await _login(client)
        first = await client.get(f"{UI}/api/runs/{run_id}")
        etag = first.headers["etag"]
        same = await client.get(f"{UI}/api/runs/{run_id}", headers={"If-None-Match": etag})
        assert same.status_code == 304
        await dash.replay(run_id, from_step="charge")
        moved = await client.get(f"{UI}/api/runs/{run_id}", headers={"If-None-Match": etag})
        assert moved.status_code == 200 and moved.headers["etag"] != etag


async def test_a_run_that_changes_while_its_answer_is_built_is_fetched_again(
    dash: FlowKeeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The answer's ETag must not be newer than its data: a live page would keep
    # the older state and be answered 304 from then on.
    run_id = (await dash.trigger("checkout", 2)).run_id
    await drive(dash, [run_id])
    run_waits = dash.run_waits
    changed = False

    async def changed_meanwhile(*args: Any, **kwargs: Any) -> Any:
        nonlocal changed
        if not changed:  # after the run was read: a new event of it
            changed = True
            async with dash.db.acquire() as conn:
                await conn.execute(
                    "INSERT INTO flowkeeper.events (run_id, kind, detail) "
                    "VALUES ($1, 'operator_note', '{}')",
                    uuid.UUID(run_id),
                )
        return await run_waits(*args, **kwargs)

    monkeypatch.setattr(dash, "run_waits", changed_meanwhile)
    async with _client(dash) as client:
        await _login(client)
        first = await client.get(f"{UI}/api/runs/{run_id}")
        assert changed and "operator_note" not in json.dumps(first.json()["events"])
        again = await client.get(
            f"{UI}/api/runs/{run_id}", headers={"If-None-Match": first.headers["etag"]}
        )
        assert again.status_code == 200
        assert "operator_note" in json.dumps(again.json()["events"])


async def test_login_never_redirects_off_the_dashboard(dash: FlowKeeper) -> None:
    async with _client(dash) as client:
        for target in ("https://evil.example/", "//evil.example/x", f"{UI}/..//evil", "/other"):
            response = await client.post(
                f"{UI}/login", data={"password": PASSWORD, "next": target}, follow_redirects=False
            )
            assert response.headers["location"] == f"{UI}/", target
