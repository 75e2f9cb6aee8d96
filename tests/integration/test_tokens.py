"""Approval tokens over real HTTP: complete once, expire with 410, forged URLs refused."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import BaseModel

from flowkeeper import (
    Context,
    FlowKeeper,
    TokenCompletedError,
    TokenExpiredError,
    TokenNotFoundError,
)
from flowkeeper.testing import FakeClock

from ..helpers import serve, wait_for


class Decision(BaseModel):
    approved: bool
    by: str


async def _waiting(fk: FlowKeeper, run_id: str) -> bool:
    return (await fk.get_run(run_id)).status.value == "waiting"


def _approval_workflow(fk: FlowKeeper, urls: dict[str, Any], timeout: float = 3600) -> None:
    @fk.workflow("review")
    async def review(ctx: Context, draft: str) -> dict[str, Any]:
        token = await ctx.create_token("approve-draft", timeout=timeout)
        await ctx.step("notify", urls.__setitem__, ctx.run_id, token)
        decision = await ctx.wait_for_token(token, model=Decision)
        if decision is None:
            return {"draft": draft, "outcome": "expired"}
        return {"draft": draft, "approved": decision.approved, "by": decision.by}


async def test_a_token_posted_over_http_completes_the_wait(fk: FlowKeeper) -> None:
    tokens: dict[str, Any] = {}
    _approval_workflow(fk, tokens)
    async with serve(fk) as server, httpx.AsyncClient(timeout=10) as http:
        handle = await fk.trigger("review", "hello")
        await wait_for(lambda: _waiting(fk, handle.run_id))
        token = tokens[handle.run_id]
        assert token.url.startswith(server.base_url + "/api/flowkeeper/tokens/")
        answer = await http.post(token.url, json={"approved": True, "by": "ada"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["run_id"] == handle.run_id
        assert await fk.result(handle.run_id, timeout=10) == {
            "draft": "hello",
            "approved": True,
            "by": "ada",
        }
        again = await http.post(token.url, json={"approved": False, "by": "eve"})
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "token_completed"
        forged = token.url[:-3] + ("aaa" if not token.url.endswith("aaa") else "bbb")
        refused = await http.post(forged, json={})
        assert refused.status_code == 404
        bad = await http.post(token.url, content=b"{not json")
        assert bad.status_code == 400
        get = await http.get(token.url)
        assert get.status_code == 405 and "POST" in get.json()["error"]["message"]


async def test_complete_token_from_code_before_the_run_waits(fk: FlowKeeper) -> None:
    gate = asyncio.Event()
    made: dict[str, Any] = {}

    @fk.workflow("early")
    async def early(ctx: Context) -> Any:
        token = await ctx.create_token("ok")
        made["token"] = token
        await ctx.step("slow", gate.wait)
        return await ctx.wait_for_token(token)

    async with serve(fk):
        handle = await fk.trigger("early")
        await wait_for(lambda: _has(made, "token"))
        assert await fk.complete_token(made["token"].id, {"yes": 1}) == handle.run_id
        gate.set()
        assert await fk.result(handle.run_id, timeout=10) == {"yes": 1}
    with pytest.raises(TokenCompletedError):
        await fk.complete_token(made["token"].id, {})
    with pytest.raises(TokenNotFoundError):
        await fk.complete_token("made-up.signature", {})


async def test_an_expired_token_is_410_and_the_wait_returns_none(
    fk: FlowKeeper, conn: asyncpg.Connection
) -> None:
    clock = await FakeClock(conn).install()
    tokens: dict[str, Any] = {}
    _approval_workflow(fk, tokens, timeout=timedelta(days=7).total_seconds())
    async with serve(fk), httpx.AsyncClient(timeout=10) as http:
        handle = await fk.trigger("review", "late draft")
        await wait_for(lambda: _waiting(fk, handle.run_id))
        await clock.advance(timedelta(days=7, seconds=1))
        answer = await http.post(tokens[handle.run_id].url, json={"approved": True})
        assert answer.status_code == 410
        assert answer.json()["error"]["code"] == "token_expired"
        await fk.tick()
        assert await fk.result(handle.run_id, timeout=10) == {
            "draft": "late draft",
            "outcome": "expired",
        }
    with pytest.raises(TokenExpiredError):
        await fk.complete_token(tokens[handle.run_id].id, {})


async def test_token_urls_are_unguessable_and_signed(fk: FlowKeeper) -> None:
    raw, signed = fk.tokens.new()
    assert len(raw) >= 32 and signed.startswith(raw + ".")
    assert fk.tokens.raw_id(signed) == raw
    assert fk.tokens.raw_id(raw + ".forged") is None
    other = FlowKeeper(fk.store.db.url, signing_key="another-key-" + "x" * 32)
    assert other.tokens.raw_id(signed) is None  # another app's key does not accept it
    await other.aclose()


async def _has(d: dict[str, Any], key: str) -> bool:
    return key in d
