"""Bad input at the endpoint: a clear error, and no other run touched."""

from __future__ import annotations

import json
import time
import uuid

import asyncpg
import httpx
import pytest

from flowkeeper import Context, FlowKeeper
from flowkeeper.signing import SIGNATURE_HEADER, sign_request

from ..helpers import KEY, drive, make_fk, serve


async def _setup(fk: FlowKeeper) -> None:
    @fk.workflow("w")
    async def w(ctx: Context, n: int) -> int:
        return await ctx.step("double", lambda: n * 2)


def _signed(
    body: bytes, path: str = "/api/flowkeeper/", key: str = KEY, ts: int | None = None
) -> dict[str, str]:
    headers = sign_request(key, method="POST", path=path, body=body, timestamp=ts)
    headers["content-type"] = "application/json"
    return headers


async def _snapshot(conn: asyncpg.Connection) -> list[tuple[object, ...]]:
    rows = await conn.fetch(
        "SELECT id, status, due_at, lease_token, invocations, updated_at FROM flowkeeper.runs ORDER BY id"
    )
    return [tuple(r) for r in rows]


@pytest.fixture
async def queued_run(fk: FlowKeeper) -> str:
    """A run left queued (its push went nowhere: the server was not up yet)."""
    await _setup(fk)
    return (await fk.trigger("w", 1)).run_id


@pytest.mark.parametrize(
    ("case", "code", "error_code"),
    [
        ("unsigned", 401, "missing_signature"),
        ("tampered", 401, "invalid_signature"),
        ("expired", 401, "expired_signature"),
        ("future", 401, "future_signature"),
        ("unknown_key", 401, "invalid_signature"),
        ("other_path", 401, "invalid_signature"),
        ("malformed", 401, "malformed_signature"),
    ],
)
async def test_refused_signatures_change_nothing(
    fk: FlowKeeper, conn: asyncpg.Connection, queued_run: str, case: str, code: int, error_code: str
) -> None:
    body = json.dumps({"run_id": queued_run, "lease": None}).encode()
    headers = _signed(body)
    if case == "unsigned":
        headers.pop(SIGNATURE_HEADER)
    elif case == "tampered":
        body = body.replace(b"null", b'"00000000-0000-0000-0000-000000000000"')
    elif case == "expired":
        headers = _signed(body, ts=int(time.time()) - 600)
    elif case == "future":
        headers = _signed(body, ts=int(time.time()) + 600)
    elif case == "unknown_key":
        headers = _signed(body, key="somebody-elses-key")
    elif case == "other_path":
        headers = _signed(body, path="/api/flowkeeper/tick")
    elif case == "malformed":
        headers[SIGNATURE_HEADER] = "garbage"
    before = await _snapshot(conn)
    async with serve(fk) as server, httpx.AsyncClient() as client:
        response = await client.post(
            f"{server.base_url}/api/flowkeeper/", content=body, headers=headers
        )
    assert response.status_code == code
    data = response.json()
    assert data["error"]["code"] == error_code
    assert data["error"]["message"]
    assert await _snapshot(conn) == before


async def test_signature_is_bound_to_the_mount_path(fk: FlowKeeper, queued_run: str) -> None:
    # Signed for the configured endpoint, delivered without the trailing slash: accepted.
    body = json.dumps({"run_id": queued_run, "lease": None, "wait": True}).encode()
    async with serve(fk) as server, httpx.AsyncClient() as client:
        response = await client.post(
            f"{server.base_url}/api/flowkeeper", content=body, headers=_signed(body)
        )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed"


@pytest.mark.parametrize("streamed", [False, True])
async def test_oversized_body_is_413(
    fk: FlowKeeper, conn: asyncpg.Connection, queued_run: str, streamed: bool
) -> None:
    body = b'{"run_id":"' + b"x" * (fk.max_body_bytes + 10) + b'"}'
    before = await _snapshot(conn)
    async with serve(fk) as server, httpx.AsyncClient() as client:
        if streamed:

            async def chunks():  # no content-length: chunked transfer
                for i in range(0, len(body), 8192):
                    yield body[i : i + 8192]

            response = await client.post(
                f"{server.base_url}/api/flowkeeper/", content=chunks(), headers=_signed(body)
            )
        else:
            response = await client.post(
                f"{server.base_url}/api/flowkeeper/", content=body, headers=_signed(body)
            )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert await _snapshot(conn) == before


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[1,2]", "JSON object"),
        (b'{"run_id": 5}', "run_id"),
        (b'{"run_id": "not-a-uuid"}', "run_id"),
        (b'{"run_id": "' + str(uuid.uuid4()).encode() + b'", "lease": "x"}', "lease"),
        (b'{"run_id": "' + str(uuid.uuid4()).encode() + b'", "wait": "yes"}', "wait"),
    ],
)
async def test_malformed_invocations_are_400(fk: FlowKeeper, body: bytes, message: str) -> None:
    await _setup(fk)
    async with serve(fk) as server, httpx.AsyncClient() as client:
        response = await client.post(
            f"{server.base_url}/api/flowkeeper/", content=body, headers=_signed(body)
        )
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


async def test_unknown_run_is_404(fk: FlowKeeper) -> None:
    await _setup(fk)
    body = json.dumps({"run_id": str(uuid.uuid4()), "lease": None}).encode()
    async with serve(fk) as server, httpx.AsyncClient() as client:
        response = await client.post(
            f"{server.base_url}/api/flowkeeper/", content=body, headers=_signed(body)
        )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "run_not_found"


async def test_unknown_workflow_defers_the_run_once_not_forever(
    database_url: str, conn: asyncpg.Connection
) -> None:
    # One deployment triggers a workflow the serving deployment does not have (yet):
    # a rolling deploy.  The run is deferred, not failed (tests/integration/
    # test_rolling_deploy.py has the whole story, grace period included).
    trigger_side = make_fk(database_url, endpoint=None)

    @trigger_side.workflow("new-feature")
    async def new_feature(ctx: Context) -> None:
        return None

    serving = make_fk(database_url)
    await _setup(serving)
    try:
        orphan = await trigger_side.trigger("new-feature")
        healthy = await serving.trigger("w", 2)
        body = json.dumps({"run_id": orphan.run_id, "lease": None}).encode()
        async with serve(serving) as server, httpx.AsyncClient() as client:
            response = await client.post(
                f"{server.base_url}/api/flowkeeper/", content=body, headers=_signed(body)
            )
            assert response.status_code == 200
            data = response.json()
            assert data["outcome"] == "deferred"
            assert data["deferred"]["reason"] == "unknown_workflow"
            assert "new-feature" in data["deferred"]["message"]
            await drive(serving, [healthy.run_id])
            # Backed off: the scheduler does not pick it up again at once.
            assert (await serving.tick()).claimed == 0
        info = await serving.get_run(orphan.run_id)
        assert info.status == "queued"
        assert info.error is None
        assert [e.kind for e in info.events] == ["workflow_unknown"]
        assert await serving.result(healthy.run_id) == 4
    finally:
        await trigger_side.aclose()
        await serving.aclose()


async def test_duplicate_invocation_of_a_finished_run_is_harmless(
    fk: FlowKeeper, queued_run: str
) -> None:
    body = json.dumps({"run_id": queued_run, "lease": None, "wait": True}).encode()
    async with serve(fk) as server, httpx.AsyncClient() as client:
        first = await client.post(
            f"{server.base_url}/api/flowkeeper/", content=body, headers=_signed(body)
        )
        again = await client.post(
            f"{server.base_url}/api/flowkeeper/", content=body, headers=_signed(body)
        )
    assert first.json()["status"] == "completed"
    assert again.status_code == 200
    assert again.json() == {
        "run_id": queued_run,
        "accepted": False,
        "status": "completed",
        "reason": "finished",
        "message": "The run has already finished (completed).",
    }


async def test_database_gone_is_503_with_advice(database_url: str) -> None:
    fk = make_fk(database_url.rsplit(":", 1)[0] + ":1/nowhere")
    await _setup(fk)
    body = json.dumps({"run_id": str(uuid.uuid4()), "lease": None}).encode()
    try:
        async with serve(fk) as server, httpx.AsyncClient() as client:
            response = await client.post(
                f"{server.base_url}/api/flowkeeper/", content=body, headers=_signed(body)
            )
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "database_unavailable"
        assert "DATABASE_URL" in error["message"]
    finally:
        await fk.aclose()


async def test_health_route_does_no_database_work(database_url: str) -> None:
    fk = make_fk(database_url.rsplit(":", 1)[0] + ":1/nowhere")
    try:
        async with serve(fk) as server, httpx.AsyncClient() as client:
            response = await client.get(f"{server.base_url}/api/flowkeeper/")
        assert response.status_code == 200
        assert response.json()["service"] == "flowkeeper"
    finally:
        await fk.aclose()
