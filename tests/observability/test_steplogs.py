"""Step logs: records emitted inside a run, kept under their step, bounded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowkeeper import Context, FlowKeeper, RetryPolicy
from flowkeeper.cli import main

from ..helpers import drive, make_fk, serve

user_log = logging.getLogger("shop.orders")


@pytest.fixture(autouse=True)
def info_level() -> Iterator[None]:
    before = user_log.level
    user_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        user_log.setLevel(before)


def shop(fk: FlowKeeper) -> None:
    tries = {"n": 0}

    async def charge(order: str) -> str:
        tries["n"] += 1
        user_log.info("charging %s (try %d)", order, tries["n"])
        if tries["n"] == 1:
            raise RuntimeError("card declined")
        return "ch_1"

    def pack(order: str) -> str:  # a sync step: its thread logs too
        logging.getLogger("shop.warehouse").warning("packing %s by hand", order)
        try:
            raise ValueError("label printer jammed")
        except ValueError:
            user_log.exception("label problem")
        return "box"

    @fk.workflow("shop", retry=RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0))
    async def run(ctx: Context, order: str) -> str:
        user_log.info("workflow started for %s", order)
        await ctx.step("charge", charge, order)
        await ctx.step("pack", pack, order)
        return "done"


async def test_logs_appear_under_their_step_and_attempt(fk: FlowKeeper) -> None:
    shop(fk)
    async with serve(fk):
        handle = await fk.trigger("shop", "o-1")
        await drive(fk, [handle.run_id])
    logs = await fk.run_logs(handle.run_id)
    seen = [(line.step, line.attempt, line.level, line.logger, line.message) for line in logs]
    # The workflow function's own line is emitted on every replay: once per invocation.
    assert ("charge", 1, "INFO", "shop.orders", "charging o-1 (try 1)") in seen
    assert ("charge", 2, "INFO", "shop.orders", "charging o-1 (try 2)") in seen
    assert ("pack", 1, "WARNING", "shop.warehouse", "packing o-1 by hand") in seen
    label = next(m for s, _, lvl, _, m in seen if s == "pack" and lvl == "ERROR")
    assert label.startswith("label problem\nTraceback") and "label printer jammed" in label
    workflow_lines = [m for s, _, _, _, m in seen if s is None and m.startswith("workflow started")]
    assert workflow_lines and all(m == "workflow started for o-1" for m in workflow_lines)


async def test_logs_in_the_cli_and_the_dashboard_json(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWKEEPER_SIGNING_KEY", "test-signing-key-0123456789abcdef")
    fk = make_fk(database_url, dashboard_password="correct horse battery")
    shop(fk)
    try:
        async with serve(fk):
            handle = await fk.trigger("shop", "o-2")
            await drive(fk, [handle.run_id])
            from flowkeeper.dashboard.routes import Dashboard

            data = await Dashboard(fk)._run_data(handle.run_id)
    finally:
        await fk.aclose()
    steps = {s["key"]: s for s in data["steps"]}
    assert [x["message"] for x in steps["charge"]["logs"]] == [
        "charging o-1 (try 1)".replace("o-1", "o-2"),
        "charging o-2 (try 2)",
    ]
    assert steps["charge"]["logs"][0]["attempt"] == 1
    assert any(x["message"] == "packing o-2 by hand" for x in steps["pack"]["logs"])
    assert any(x["message"].startswith("workflow started") for x in data["workflow_logs"])
    code = await asyncio.to_thread(
        main, ["runs", "show", handle.run_id, "--logs", "--database-url", database_url]
    )
    out = capsys.readouterr().out
    assert code == 0
    section = out[out.index("\nlogs") :]
    assert "  charge (attempt 1)" in section and "charging o-2 (try 1)" in section
    assert section.index("charge (attempt 2)") < section.index("pack (attempt 1)")
    assert "WARNING  shop.warehou packing o-2 by hand" in section


async def test_a_10_mb_flood_is_capped_and_says_so(fk: FlowKeeper) -> None:
    line = "x" * 1000

    def flood() -> int:
        for i in range(10_000):  # 10 MB of log messages
            user_log.info("%d %s", i, line)
        return 1

    async def quiet() -> int:
        user_log.info("after the flood")
        return 2

    @fk.workflow("flood")
    async def wf(ctx: Context) -> None:
        await ctx.step("flood", flood)
        await ctx.step("quiet", quiet)

    async with serve(fk):
        handle = await fk.trigger("flood")
        await drive(fk, [handle.run_id])
    logs = await fk.run_logs(handle.run_id)
    flood_lines = [x for x in logs if x.step == "flood"]
    kept = sum(len(x.message) for x in flood_lines)
    assert kept <= 64 * 1024 + 1000
    assert flood_lines[0].message.startswith("0 xxx")
    note = flood_lines[-1]
    assert note.level == "WARNING" and note.logger == "flowkeeper"
    assert "not kept: over the cap of 65536 bytes of logs per step" in note.message
    dropped = int(note.message.split(" log record(s)")[0].split()[-1])
    assert len(flood_lines) - 1 + dropped >= 10_000
    # The next step still has its line: the cap is per step.
    assert [x.message for x in logs if x.step == "quiet"] == ["after the flood"]


async def test_the_run_cap_bounds_a_run_with_many_steps(database_url: str) -> None:
    fk = make_fk(database_url, step_log_bytes=2048, run_log_bytes=8192)

    def noisy(i: int) -> int:
        user_log.info("step %d %s", i, "y" * 1500)
        return i

    @fk.workflow("many")
    async def wf(ctx: Context) -> None:
        for i in range(20):
            await ctx.step("noisy", noisy, i)

    try:
        async with serve(fk):
            handle = await fk.trigger("many")
            await drive(fk, [handle.run_id])
        logs = await fk.run_logs(handle.run_id)
    finally:
        await fk.aclose()
    assert sum(len(x.message) for x in logs if x.logger != "flowkeeper") <= 8192
    caps = [x for x in logs if x.message.startswith("[flowkeeper] run log cap of 8192 bytes")]
    assert len(caps) == 1
    assert logs[0].message.startswith("step 0 ")


async def test_hostile_messages_are_stored_and_print_is_optional(database_url: str) -> None:
    fk = make_fk(database_url, capture_print=True)

    def hostile() -> None:
        user_log.info("nul \x00 lone \ud800 end")
        print("printed inside the step")

    @fk.workflow("hostile")
    async def wf(ctx: Context) -> None:
        await ctx.step("hostile", hostile)

    try:
        async with serve(fk):
            handle = await fk.trigger("hostile")
            await drive(fk, [handle.run_id])
        logs = await fk.run_logs(handle.run_id)
    finally:
        await fk.aclose()
    messages = [x.message for x in logs if x.step == "hostile"]
    assert messages[0].startswith("nul ") and messages[0].endswith(" end")
    assert "\x00" not in messages[0]
    assert ("print", "printed inside the step") in [(x.logger, x.message) for x in logs]


def test_a_record_whose_formatting_fails_is_kept_with_a_note() -> None:
    from flowkeeper.steplogs import _message

    record = logging.LogRecord("x", logging.INFO, "", 0, "bad %d", ("nan",), None)
    assert _message(record) == "'bad %d' (formatting failed: TypeError)"
    huge = logging.LogRecord("x", logging.INFO, "", 0, "z" * 50_000, None, None)
    assert len(_message(huge)) <= 8_000 and _message(huge).endswith("characters cut]")


async def test_flowkeeper_records_carry_the_run_as_extra(
    fk: FlowKeeper, caplog: pytest.LogCaptureFixture
) -> None:
    shop(fk)
    caplog.set_level(logging.INFO, logger="flowkeeper")
    async with serve(fk):
        handle = await fk.trigger("shop", "o-3")
        await drive(fk, [handle.run_id])
    retrying = [r for r in caplog.records if r.name == "flowkeeper" and "retrying" in r.message]
    assert retrying
    record = retrying[0]
    assert (record.run_id, record.workflow) == (handle.run_id, "shop")  # type: ignore[attr-defined]
    assert record.step is None  # type: ignore[attr-defined]  # logged after the attempt


async def test_lines_of_a_long_step_are_stored_while_it_runs(fk: FlowKeeper) -> None:
    """So a step whose process dies (or that hangs) still shows what it logged."""
    go_on = asyncio.Event()

    async def slow() -> int:
        user_log.info("about to call the slow API")
        await go_on.wait()
        return 1

    @fk.workflow("slow")
    async def wf(ctx: Context) -> int:
        return await ctx.step("slow", slow)

    async with serve(fk):
        handle = await fk.trigger("slow")
        try:
            for _ in range(100):
                logs = await fk.run_logs(handle.run_id)
                if logs:
                    break
                await asyncio.sleep(0.05)
            assert [(x.step, x.message) for x in logs] == [("slow", "about to call the slow API")]
            assert (await fk.get_run(handle.run_id)).status.value == "running"
        finally:
            go_on.set()
        await drive(fk, [handle.run_id])
    # Stored once, not again at the step's end.
    assert [x.message for x in await fk.run_logs(handle.run_id)] == ["about to call the slow API"]


@given(messages=st.lists(st.text(max_size=3000), min_size=1, max_size=8))
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
async def test_any_text_is_stored_as_it_was_logged_or_said_cut(
    fk: FlowKeeper, messages: list[str]
) -> None:
    """NUL, lone surrogates, huge lines: what comes back is the text (cleaned) or says cut."""
    from datetime import timedelta

    from flowkeeper.ids import new_run_id
    from flowkeeper.serialization import clean_text
    from flowkeeper.steplogs import _Buffer

    run_id, _ = await fk.store.insert_run(
        run_id=new_run_id(),
        workflow="hostile",
        input_json="null",
        idempotency_key=None,
        lease_token=None,
        lease=timedelta(0),
    )
    buffer = _Buffer(logging.INFO, 16 * 1024)
    for text in messages:
        buffer.add("s", 1, logging.LogRecord("hostile", logging.INFO, "", 0, text, None, None))
    await fk.store.step_logs_append(run_id, buffer.take(None), 1024 * 1024)
    stored = [line.message for line in await fk.run_logs(run_id)]
    kept = [m for m in stored if not m.startswith("[flowkeeper]")]
    assert len(kept) <= len(messages)
    for got, sent in zip(kept, messages, strict=False):
        assert got == clean_text(sent) or got.endswith(" …[cut]")
    assert sum(len(m) for m in kept) <= 16 * 1024 + len(" …[cut]")
