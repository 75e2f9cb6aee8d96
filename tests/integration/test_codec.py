"""Encryption at rest: no plaintext in the raw tables; key rotation; clear errors."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowkeeper import Context, FlowKeeper, NonRetriableError, RetryPolicy
from flowkeeper.codec import PREFIX, AesGcmCodec, CodecKeyError, DecryptionError, Sealer

from ..helpers import drive, make_fk, serve, wait_for

K1 = AesGcmCodec.generate_key()
K2 = AesGcmCodec.generate_key()
FAST = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.01)
PASSWORD = "correct horse battery staple"


def _secrets_workflows(fk: FlowKeeper) -> None:
    tries: dict[str, int] = {}

    def flaky(tag: str) -> str:
        tries[tag] = tries.get(tag, 0) + 1
        if tries[tag] == 1:
            raise RuntimeError(f"SECRET-ATTEMPT-ERROR {tag}")
        return f"SECRET-STEP-OUTPUT {tag}"

    async def record(conn: asyncpg.Connection, tag: str) -> str:
        return f"SECRET-TX-OUTPUT {tag}"

    def broken(tag: str) -> None:
        raise NonRetriableError(f"SECRET-FINAL-ERROR {tag}")

    @fk.workflow("secretive")
    async def secretive(ctx: Context, card: dict[str, str]) -> dict[str, Any]:
        a = await ctx.step("flaky", flaky, card["number"], retry=FAST)
        b = await ctx.transaction("record", record, card["number"])
        return {"a": a, "b": b, "card": card}

    @fk.workflow("failing")
    async def failing(ctx: Context, card: dict[str, str]) -> None:
        await ctx.step("broken", broken, card["number"])


async def _raw(conn: asyncpg.Connection) -> str:
    parts = []
    for table in ("runs", "steps", "events"):
        rows = await conn.fetch(f"SELECT row_to_json(t)::text AS j FROM flowkeeper.{table} t")
        parts += [r["j"] for r in rows]
    return "\n".join(parts)


async def test_raw_tables_hold_no_plaintext_and_readers_decrypt(
    database_url: str, conn: asyncpg.Connection
) -> None:
    fk = make_fk(database_url, codec=AesGcmCodec([K1]), dashboard_password=PASSWORD)
    _secrets_workflows(fk)
    try:
        async with serve(fk):
            ok = (await fk.trigger("secretive", {"number": "SECRET-CARD-4242"})).run_id
            bad = (await fk.trigger("failing", {"number": "SECRET-CARD-1111"})).run_id
            await drive(fk, [ok, bad])
            assert await fk.result(ok) == {
                "a": "SECRET-STEP-OUTPUT SECRET-CARD-4242",
                "b": "SECRET-TX-OUTPUT SECRET-CARD-4242",
                "card": {"number": "SECRET-CARD-4242"},
            }
            info = await fk.get_run(bad)
            assert info.error is not None
            assert "SECRET-FINAL-ERROR" in info.error["message"]
            ok_info = await fk.get_run(ok)
            assert ok_info.input == {"number": "SECRET-CARD-4242"}
            [flaky] = [s for s in ok_info.steps if s.key == "flaky"]
            assert "SECRET-ATTEMPT-ERROR" in flaky.failed_attempts[0].message
            page = await fk.list_runs(workflow="failing")
            assert "SECRET-FINAL-ERROR" in (page.runs[0].error_message or "")
            # The dashboard decrypts for a signed-in user.
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{fk.test_port}") as client:  # type: ignore[attr-defined]
                await client.post("/api/flowkeeper/ui/login", data={"password": PASSWORD})
                body = (await client.get(f"/api/flowkeeper/ui/api/runs/{ok}")).json()
            assert body["input"] == {"number": "SECRET-CARD-4242"}
    finally:
        await fk.aclose()
    raw = await _raw(conn)
    assert "SECRET" not in raw
    assert PREFIX in raw  # sealed, not dropped
    # What SQL reads stays readable: statuses, step kinds, error types.
    assert (
        await conn.fetchval("SELECT error->>'type' FROM flowkeeper.runs WHERE id = $1", bad)
        == NonRetriableError.__module__ + ".NonRetriableError"
    )


async def test_key_rotation(database_url: str, conn: asyncpg.Connection) -> None:
    old = make_fk(database_url, codec=AesGcmCodec([K1]))

    @old.workflow("nap")
    async def nap(ctx: Context, secret: str) -> str:
        first = await ctx.step("first", lambda: f"{secret}-1")
        await ctx.sleep("zz", 0.2)
        return first + "-done"

    try:
        async with serve(old):
            before = (await old.trigger("nap", "SECRET-A")).run_id
            await drive(old, [before])
            sleeping = (await old.trigger("nap", "SECRET-B")).run_id
    finally:
        await old.aclose()
    kid1, kid2 = AesGcmCodec([K1]).key_ids[0], AesGcmCodec([K2]).key_ids[0]

    rotated = make_fk(database_url, codec=AesGcmCodec([K2, K1]))
    rotated.workflow("nap")(nap)
    try:
        async with serve(rotated):
            assert await rotated.result(before) == "SECRET-A-1-done"  # old key still reads
            await drive(rotated, [sleeping])
            assert await rotated.result(sleeping) == "SECRET-B-1-done"
            after = (await rotated.trigger("nap", "SECRET-C")).run_id
            await drive(rotated, [after])
    finally:
        await rotated.aclose()
    new_input = await conn.fetchval("SELECT input::text FROM flowkeeper.runs WHERE id = $1", after)
    assert f".{kid2}." in new_input and f".{kid1}." not in new_input  # the first key writes

    only_new = make_fk(database_url, codec=AesGcmCodec([K2]))
    only_new.workflow("nap")(nap)
    try:
        assert await only_new.result(after) == "SECRET-C-1-done"
        with pytest.raises(DecryptionError, match=f"key id {kid1}"):
            await only_new.get_run(before)
        # A run written with the dropped key fails with the reason, rather than loop.
        async with serve(only_new):
            stuck = await conn.fetchval("SELECT count(*) FROM flowkeeper.runs")
            assert stuck == 3
            await conn.execute(
                "UPDATE flowkeeper.runs SET status = 'queued', due_at = now(), output = NULL "
                "WHERE id = $1",
                before,
            )
            await conn.execute(
                "DELETE FROM flowkeeper.steps WHERE run_id = $1 AND key = 'zz'", before
            )

            async def failed() -> bool:
                await only_new.tick()
                status = await conn.fetchval(
                    "SELECT status FROM flowkeeper.runs WHERE id = $1", before
                )
                return bool(status == "failed")

            await wait_for(failed)
        error = json.loads(
            await conn.fetchval("SELECT error::text FROM flowkeeper.runs WHERE id = $1", before)
        )
        assert error["type"] == "flowkeeper.errors.DecryptionError"
        message = Sealer(AesGcmCodec([K2])).open_text(error["message"])  # sealed, too
        assert message is not None and f"key id {kid1}" in message
    finally:
        await only_new.aclose()


def test_bad_keys_and_tampered_values() -> None:
    for bad in (b"short", "not base64 !!", b"x" * 33, 42):
        with pytest.raises(CodecKeyError):
            AesGcmCodec([bad])  # type: ignore[list-item]
    with pytest.raises(CodecKeyError, match="at least one key"):
        AesGcmCodec([])
    codec = AesGcmCodec([K1])
    token = codec.encrypt(b'{"card": 1}')
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(DecryptionError, match="failed to authenticate"):
        codec.decrypt(flipped)
    with pytest.raises(DecryptionError, match="not among the configured keys"):
        AesGcmCodec([K2]).decrypt(token)
    with pytest.raises(DecryptionError, match="has no codec"):
        Sealer(None).open_json(Sealer(codec).seal_json("1"))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",))),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_sealing_round_trips_exact_json_text(value: Any) -> None:
    sealer = Sealer(AesGcmCodec([K1]))
    text = json.dumps(value, ensure_ascii=False)
    sealed = sealer.seal_json(text)
    assert sealed is not None and json.loads(sealed).startswith(PREFIX)
    assert sealer.open_json(sealed) == text  # exact text: key order, numbers
    error = {"type": "E", "message": text, "nested": {"traceback": text}}
    assert sealer.open_error(sealer.seal_error(error)) == error
