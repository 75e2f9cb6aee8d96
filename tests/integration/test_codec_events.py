"""Event data, stream messages and log lines sealed at rest; waits still match, on hashes."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowkeeper import CancelOn, Context, FlowKeeper
from flowkeeper.codec import AesGcmCodec

from ..helpers import KEY, drive, make_fk, serve, wait_for

K1 = AesGcmCodec.generate_key()
K2 = AesGcmCodec.generate_key()
TABLES = ("runs", "steps", "events", "event_log", "waits", "tokens", "stream_messages", "step_logs")


async def _raw(conn: asyncpg.Connection) -> str:
    parts = []
    for table in TABLES:
        rows = await conn.fetch(f"SELECT row_to_json(t)::text AS j FROM flowkeeper.{table} t")
        parts += [r["j"] for r in rows]
    return "\n".join(parts)


async def _status(fk: FlowKeeper, run_id: str) -> str:
    return (await fk.get_run(run_id)).status.value


def _orders(fk: FlowKeeper, audited: list[Any], tokens: dict[str, Any]) -> None:
    @fk.workflow("order", cancel_on=[CancelOn("user.deleted", match={"user": "input.user"})])
    async def order(ctx: Context, inp: dict[str, str]) -> dict[str, Any]:
        paid = await ctx.wait_for_event("paid", event="paid", match={"order_id": inp["order"]})
        early = await ctx.wait_for_event(
            "early", event="early", match={"ref": {"order": inp["order"]}}
        )
        token = await ctx.create_token("approve")
        tokens[inp["order"]] = token
        approval = await ctx.wait_for_token(token)
        return {"paid": paid, "early": early, "approval": approval}

    @fk.workflow("audit", on_event="paid")
    async def audit(ctx: Context, data: dict[str, Any]) -> None:
        audited.append(data)


async def test_event_data_matches_and_tokens_hold_no_plaintext(
    database_url: str, conn: asyncpg.Connection
) -> None:
    fk = make_fk(database_url, codec=AesGcmCodec([K1]))
    audited: list[Any] = []
    tokens: dict[str, Any] = {}
    _orders(fk, audited, tokens)
    try:
        async with serve(fk):
            one = (await fk.trigger("order", {"order": "SECRET-O1", "user": "SECRET-U1"})).run_id
            two = (await fk.trigger("order", {"order": "SECRET-O2", "user": "SECRET-U2"})).run_id
            three = (await fk.trigger("order", {"order": "SECRET-O3", "user": "SECRET-U3"})).run_id
            for rid in (one, two, three):
                await wait_for(lambda rid=rid: _is(fk, rid, "waiting"))  # type: ignore[misc]
            # Sent before run one waits for it: found by the wait's look-back.
            await fk.send_event("early", {"ref": {"order": "SECRET-O1"}, "x": "SECRET-E0"})
            sent = await fk.send_event("paid", {"order_id": "SECRET-O1", "card": "SECRET-E1"})
            assert sent.woken == [one]  # not two or three: their hashes differ
            assert len(sent.started) == 1  # audit, with the data as its input
            cancelled = await fk.send_event("user.deleted", {"user": "SECRET-U2"})
            assert cancelled.cancelled == [two]

            async def approval_waiting() -> bool:
                await fk.tick()
                return any(w.kind == "token" and w.outcome is None for w in await fk.run_waits(one))

            await wait_for(approval_waiting)
            await fk.complete_token(tokens["SECRET-O1"].id, {"note": "SECRET-T1"})
            statuses = await drive(fk, [one, two, *sent.started])
            assert statuses[one] == "completed" and statuses[two] == "cancelled"
            assert await fk.result(one) == {
                "paid": {"order_id": "SECRET-O1", "card": "SECRET-E1"},
                "early": {"ref": {"order": "SECRET-O1"}, "x": "SECRET-E0"},
                "approval": {"note": "SECRET-T1"},
            }
            assert audited[-1] == {"order_id": "SECRET-O1", "card": "SECRET-E1"}
            assert await _status(fk, three) == "waiting"
            # Readers open what they show: the event list, an event, a run's waits.
            events = {e.name: e for e in await fk.list_events()}
            assert events["paid"].data == {"order_id": "SECRET-O1", "card": "SECRET-E1"}
            shown = await fk.get_event(events["paid"].id)
            assert shown is not None and shown.data == events["paid"].data
            matches = {w.key: w.match for w in await fk.run_waits(three)}
            assert matches["paid"] == {"order_id": "SECRET-O3"}
            [wait_step] = [s for s in (await fk.get_run(three)).steps if s.key == "paid"]
            assert wait_step.input["match"] == {"order_id": "SECRET-O3"}
    finally:
        await fk.aclose()
    raw = await _raw(conn)
    assert "SECRET" not in raw
    # Field names stay readable (the index keeps the structure), values do not.
    data = await conn.fetchval("SELECT data::text FROM flowkeeper.event_log WHERE name = 'paid'")
    assert "order_id" in data and "fk:h:" in data


async def _is(fk: FlowKeeper, run_id: str, status: str) -> bool:
    await fk.tick()
    return await _status(fk, run_id) == status


async def test_a_wait_registered_before_a_key_rotation_still_matches(
    database_url: str, conn: asyncpg.Connection
) -> None:
    old = make_fk(database_url, codec=AesGcmCodec([K1]))

    @old.workflow("await-paid", cancel_on=[CancelOn("stop", match={"who": "input.who"})])
    async def await_paid(ctx: Context, inp: dict[str, Any]) -> Any:
        return await ctx.wait_for_event("w", event="paid", match={"n": inp["n"]})

    try:
        async with serve(old):
            woken = (await old.trigger("await-paid", {"n": 7, "who": "a"})).run_id
            stopped = (await old.trigger("await-paid", {"n": 8, "who": "b"})).run_id
            for rid in (woken, stopped):
                await wait_for(lambda rid=rid: _is(old, rid, "waiting"))  # type: ignore[misc]
    finally:
        await old.aclose()

    rotated = make_fk(database_url, codec=AesGcmCodec([K2, K1]))
    rotated.workflow("await-paid", cancel_on=[CancelOn("stop", match={"who": "input.who"})])(
        await_paid
    )
    try:
        async with serve(rotated):
            # 7.0 is 7 to jsonb; it is to the hashed index too.
            assert (await rotated.send_event("paid", {"n": 7.0, "v": "x"})).woken == [woken]
            assert (await rotated.send_event("stop", {"who": "b"})).cancelled == [stopped]
            # A wait registered now is scoped to the new key, and found by it.
            fresh = (await rotated.trigger("await-paid", {"n": 9, "who": "c"})).run_id
            await wait_for(lambda: _is(rotated, fresh, "waiting"))
            assert (await rotated.send_event("paid", {"n": 9})).woken == [fresh]
            statuses = await drive(rotated, [woken, stopped, fresh])
            assert statuses == {woken: "completed", stopped: "cancelled", fresh: "completed"}
            assert await rotated.result(woken) == {"n": 7.0, "v": "x"}
    finally:
        await rotated.aclose()
    kid1, kid2 = AesGcmCodec([K1]).key_ids[0], AesGcmCodec([K2]).key_ids[0]
    scopes = await conn.fetch(
        "SELECT DISTINCT paths[1] AS p FROM flowkeeper.waits WHERE kind = 'event'"
    )
    assert {r["p"] for r in scopes} == {f"fk-{kid1}.n", f"fk-{kid2}.n"}


# Values that jsonb compares in surprising ways (7 = 7.0 = 7e0, -0 = 0, "7" != 7,
# true != 1), big numbers past float precision, and text that looks alike.
_tricky = st.sampled_from(
    [
        0,
        -0.0,
        0.0,
        1,
        1.0,
        True,
        False,
        "1",
        "",
        7,
        7.0,
        70,
        0.7,
        1e16,
        10**16,
        10**16 + 1,
        2**63,
        2**63 + 1,
        0.1,
        0.30000000000000004,
        1.5,
        "é",
        "e\u0301",
        "fk:h:x",
        -1,
        "-1",
    ]
)
_scalars = (
    _tricky
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6)
    | st.booleans()
)
_event_values = (
    _scalars
    | st.none()
    | st.lists(_scalars, max_size=2)
    | st.dictionaries(st.text(max_size=3), _scalars, max_size=2)
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(wanted=_scalars, sent=_event_values | _tricky, first=st.booleans())
async def test_hashed_matching_is_jsonb_equality(
    database_url: str, conn: asyncpg.Connection, wanted: Any, sent: Any, first: bool
) -> None:
    """With a codec, a wait matches exactly the events Postgres's own jsonb equality would."""
    fk = FlowKeeper(database_url, signing_key=KEY, codec=AesGcmCodec([K1]))
    try:

        @fk.workflow("match-one")
        async def wf(ctx: Context, inp: dict[str, Any]) -> Any:
            return await ctx.wait_for_event(
                "w", event="v", match={"tag": inp["tag"], "v": inp["v"]}, lookback=60
            )

        tag = str(uuid.uuid4())  # examples share the database: no earlier event may match
        if first:  # sent before the wait exists: the look-back's containment must agree
            await fk.send_event("v", {"tag": tag, "v": sent})
        handle = await fk.trigger("match-one", {"tag": tag, "v": wanted})
        await fk.advance(handle.run_id)
        if not first:
            await fk.send_event("v", {"tag": tag, "v": sent})
        expected = await conn.fetchval(
            "SELECT $1::jsonb = $2::jsonb", json.dumps(wanted), json.dumps(sent)
        )
        status = await _status(fk, handle.run_id)
        run = await fk.get_run(handle.run_id)
        [wait] = [s for s in run.steps if s.key == "w"]
        matched = wait.status == "completed"
        assert matched == expected, (wanted, sent, first, status)
    finally:
        await fk.aclose()


def test_unkeyed_codecs_keep_the_index_readable() -> None:
    """A codec without match_keys seals payloads; the index is the data (documented)."""
    from flowkeeper.codec import Sealer

    class Plain:
        def encrypt(self, plaintext: bytes) -> str:
            return plaintext.hex()

        def decrypt(self, token: str) -> bytes:
            return bytes.fromhex(token)

    sealer = Sealer(Plain())
    assert sealer.event_index('{"a": 1}') is None
    assert sealer.wait_index(["a"], [1], {"a": 1}) == (["a"], [1], {"a": 1})
    assert sealer.open_json(sealer.seal_json('{"a": 1}')) == '{"a": 1}'


async def test_stream_messages_and_log_lines_are_sealed(
    database_url: str, conn: asyncpg.Connection
) -> None:
    fk = make_fk(database_url, codec=AesGcmCodec([K1]))
    log = logging.getLogger("shop.sealed")
    log.setLevel(logging.INFO)

    async def charge(card: str) -> str:
        log.info("charging %s", card)
        return "ok"

    @fk.workflow("publisher")
    async def publisher(ctx: Context, card: str) -> str:
        await ctx.publish("progress", {"card": card})
        return await ctx.step("charge", charge, card)

    try:
        async with serve(fk):
            rid = (await fk.trigger("publisher", "SECRET-CARD-9")).run_id
            await drive(fk, [rid])
            messages = [m async for m in fk.stream(rid)]
            assert [(m.topic, m.data) for m in messages] == [
                ("progress", {"card": "SECRET-CARD-9"})
            ]
            lines = [line.message for line in await fk.run_logs(rid)]
            assert "charging SECRET-CARD-9" in lines
    finally:
        await fk.aclose()
    assert "SECRET" not in await _raw(conn)
    # A reader without the key sees that a line is sealed, and nothing breaks.
    other = make_fk(database_url, codec=AesGcmCodec([K2]))
    try:
        [line] = [x for x in await other.run_logs(rid) if x.logger == "shop.sealed"]
        assert line.message.startswith("(sealed, cannot be opened here:")
    finally:
        await other.aclose()
