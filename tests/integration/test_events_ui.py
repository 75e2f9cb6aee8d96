"""Events and waits where users look: the dashboard's run JSON and Events pages, the CLI.

Real PostgreSQL, the endpoint and dashboard under a real uvicorn.  A waiting
run's JSON says what it waits for and until when; once resolved, which event
did it.  The Events page lists events newest first, pages and searches them,
and each event's page names the runs it woke, started or cancelled.  Hostile
filters get a 400 with a message, never a 500.  ``flowkeeper events
send|list|show`` and ``runs show`` say the same in a terminal.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from flowkeeper import CancelOn, Context, FlowKeeper
from flowkeeper.cli import main

from ..helpers import Served, make_fk, wait_for
from .hostile import raw_request

PASSWORD = "correct horse battery staple"
UI = "/api/flowkeeper/ui"


def _workflows(fk: FlowKeeper) -> None:
    @fk.workflow("pay")
    async def pay(ctx: Context, order: int) -> Any:
        paid = await ctx.wait_for_event(
            "paid", event="invoice.paid", match={"order_id": order}, timeout=timedelta(hours=2)
        )
        return {"paid": paid}

    @fk.workflow("approve")
    async def approve(ctx: Context) -> Any:
        token = await ctx.create_token("refund")
        return await ctx.wait_for_token(token)

    @fk.workflow("close-out", on_event="order.closed")
    async def close_out(ctx: Context, data: dict[str, Any]) -> str:
        return f"closed {data['order']}"

    @fk.workflow("closing")
    async def closing(ctx: Context, order: int) -> Any:
        return await ctx.wait_for_event("closed", event="order.closed", match={"order": order})

    @fk.workflow("drip", cancel_on=[CancelOn("order.closed", match={"order": "input.order"})])
    async def drip(ctx: Context, data: dict[str, Any]) -> None:
        await ctx.sleep("nap", timedelta(days=1))

    @fk.workflow("announcer")
    async def announcer(ctx: Context) -> None:
        await ctx.send_event("order.announced", {"by": "workflow"})


@pytest.fixture
async def dash(database_url: str) -> AsyncIterator[FlowKeeper]:
    fk = make_fk(database_url, dashboard_password=PASSWORD)
    _workflows(fk)
    try:
        async with Served(fk.asgi(), fk.test_port):  # type: ignore[attr-defined]
            yield fk
    finally:
        await fk.aclose()


@pytest.fixture
async def client(dash: FlowKeeper) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{dash.test_port}") as c:  # type: ignore[attr-defined]
        login = await c.post(
            f"{UI}/login", data={"password": PASSWORD, "next": f"{UI}/"}, follow_redirects=False
        )
        assert login.status_code == 303
        yield c


def _page_data(html: str) -> Any:
    match = re.search(r'<script type="application/json" id="fk-data">(.*?)</script>', html, re.S)
    assert match, "no data block"
    return json.loads(match.group(1))


async def _is(fk: FlowKeeper, run_id: str, status: str) -> bool:
    return (await fk.get_run(run_id)).status == status


def _wait_lane(data: dict[str, Any], key: str) -> dict[str, Any]:
    [lane] = [lane for lane in data["timeline"]["lanes"] if lane["key"] == key]
    return lane


# the run page's JSON ------------------------------------------------------------------------
async def test_a_waiting_run_then_resolved_in_the_run_json(
    dash: FlowKeeper, client: httpx.AsyncClient
) -> None:
    run_id = (await dash.trigger("pay", 42)).run_id
    await wait_for(lambda: _is(dash, run_id, "waiting"))

    waiting = await client.get(f"{UI}/api/runs/{run_id}")
    assert waiting.status_code == 200
    data = waiting.json()
    assert data["status"] == "waiting"
    [wait] = data["waits"]
    assert wait["key"] == "paid" and wait["kind"] == "event"
    assert wait["event"] == "invoice.paid" and wait["match"] == {"order_id": 42}
    assert wait["label"] == "invoice.paid {order_id: 42}"
    assert wait["state"] == "waiting" and wait["outcome"] is None
    assert wait["timeout_at"] is not None and wait["event_number"] is None
    lane = _wait_lane(data, "paid")
    assert lane["kind"] == "wait" and lane["status"] == "waiting"
    [span] = lane["spans"]
    assert span["kind"] == "wait" and span["outcome"] == "waiting"
    assert span["end"] is None  # open: up to "now"
    assert span["label"] == "invoice.paid {order_id: 42}"
    assert span["until"] == wait["timeout_at"] and span["event"] is None
    # The runs list filters by the new status; the run page carries the same JSON.
    listed = await client.get(f"{UI}/api/runs", params={"status": "waiting"})
    assert [r["id"] for r in listed.json()["runs"]] == [run_id]
    assert listed.json()["counts"]["waiting"] == 1
    page = await client.get(f"{UI}/runs/{run_id}")
    assert _page_data(page.text)["waits"][0]["label"] == "invoice.paid {order_id: 42}"
    etag = waiting.headers["etag"]
    assert (
        await client.get(f"{UI}/api/runs/{run_id}", headers={"if-none-match": etag})
    ).status_code == 304

    sent = await dash.send_event("invoice.paid", {"order_id": 42, "amount": 990})
    assert sent.woken == [run_id]
    assert await dash.result(run_id, timeout=10) == {"paid": {"order_id": 42, "amount": 990}}
    resolved = await client.get(f"{UI}/api/runs/{run_id}", headers={"if-none-match": etag})
    assert resolved.status_code == 200  # the wake changed the run's version
    data = resolved.json()
    [wait] = data["waits"]
    assert wait["state"] == "completed" and wait["outcome"] == "event"
    assert wait["event_number"] == sent.id and wait["resolved_at"] is not None
    [span] = _wait_lane(data, "paid")["spans"]
    assert span["outcome"] == "completed" and span["end"] is not None
    assert span["event"] == sent.id
    [step] = [s for s in data["steps"] if s["key"] == "paid"]
    assert step["kind"] == "wait" and step["output"] == {"order_id": 42, "amount": 990}


async def test_a_token_wait_and_a_cancel_on_rule_in_the_run_json(
    dash: FlowKeeper, client: httpx.AsyncClient
) -> None:
    approval = (await dash.trigger("approve")).run_id
    drip = (await dash.trigger("drip", {"order": 5})).run_id
    await wait_for(lambda: _is(dash, approval, "waiting"))
    await wait_for(lambda: _is(dash, drip, "sleeping"))

    data = (await client.get(f"{UI}/api/runs/{approval}")).json()
    [wait] = data["waits"]
    assert wait["kind"] == "token" and wait["label"] == "approval token refund"
    assert "token_id" not in wait  # the raw token id stays in the database
    assert _wait_lane(data, "approval:refund")["spans"][0]["label"] == "approval token refund"
    token = next(s for s in data["steps"] if s["key"] == "token:refund")["output"]["id"]
    await dash.complete_token(token, {"ok": True})
    assert await dash.result(approval, timeout=10) == {"ok": True}
    [wait] = (await client.get(f"{UI}/api/runs/{approval}")).json()["waits"]
    assert wait["state"] == "completed" and wait["outcome"] == "token"

    # A cancel_on rule is listed with the run's waits, but is no lane of its timeline.
    data = (await client.get(f"{UI}/api/runs/{drip}")).json()
    [rule] = data["waits"]
    assert rule["kind"] == "cancel" and rule["label"] == "cancel on order.closed {order: 5}"
    assert [lane["key"] for lane in data["timeline"]["lanes"]] == ["nap"]
    sent = await dash.send_event("order.closed", {"order": 5})
    assert sent.cancelled == [drip]
    data = (await client.get(f"{UI}/api/runs/{drip}")).json()
    assert data["status"] == "cancelled"
    assert data["waits"][0]["outcome"] == "cancelled"
    assert data["waits"][0]["event_number"] == sent.id
    [cancelled] = [e for e in data["events"] if e["kind"] == "cancelled"]
    assert cancelled["detail"]["event_id"] == sent.id  # the page links it


async def test_a_wait_the_run_was_cancelled_in_ends_with_the_run(
    dash: FlowKeeper, client: httpx.AsyncClient
) -> None:
    run_id = (await dash.trigger("pay", 7)).run_id
    await wait_for(lambda: _is(dash, run_id, "waiting"))
    assert await dash.cancel(run_id)
    data = (await client.get(f"{UI}/api/runs/{run_id}")).json()
    lane = _wait_lane(data, "paid")
    assert lane["status"] == "cancelled"
    [span] = lane["spans"]
    assert span["outcome"] == "cancelled" and span["end"] == data["finished_at"]


# the Events page ---------------------------------------------------------------------------
async def test_events_list_search_and_pages(dash: FlowKeeper, client: httpx.AsyncClient) -> None:
    numbers = []
    for i in range(5):
        sent = await dash.send_event(
            "invoice.paid" if i % 2 else "user.signup", {"i": i, "text": "x" * 300}, id=f"evt-{i}"
        )
        numbers.append(sent.id)
    newest_first = numbers[::-1]

    first = (await client.get(f"{UI}/api/events", params={"limit": 2})).json()
    assert [e["number"] for e in first["events"]] == newest_first[:2]
    assert first["next_before"] == newest_first[1]
    assert first["query"] == {"limit": "2"}
    second = (
        await client.get(f"{UI}/api/events", params={"limit": 2, "before": first["next_before"]})
    ).json()
    assert [e["number"] for e in second["events"]] == newest_first[2:4]
    third = (
        await client.get(f"{UI}/api/events", params={"limit": 2, "before": second["next_before"]})
    ).json()
    assert [e["number"] for e in third["events"]] == newest_first[4:]
    assert third["next_before"] is None

    event = first["events"][0]
    assert event["name"] == "user.signup" and event["event_id"] == "evt-4"
    assert event["woke"] == event["started"] == event["cancelled"] == 0
    assert len(event["preview"]) <= 160 and event["preview"].endswith("…")  # data is clipped

    by_name = (await client.get(f"{UI}/api/events", params={"name": "invoice.paid"})).json()
    assert [e["number"] for e in by_name["events"]] == [numbers[3], numbers[1]]
    by_id = (await client.get(f"{UI}/api/events", params={"id": "evt-2"})).json()
    assert [e["number"] for e in by_id["events"]] == [numbers[2]]
    none = (await client.get(f"{UI}/api/events", params={"name": "nope"})).json()
    assert none["events"] == [] and none["next_before"] is None

    page = await client.get(f"{UI}/events", params={"name": "invoice.paid"})
    assert page.status_code == 200 and 'data-page="events"' in page.text
    assert [e["number"] for e in _page_data(page.text)["events"]] == [numbers[3], numbers[1]]
    assert f'href="{UI}/events"' in (await client.get(f"{UI}/")).text  # in the nav


async def test_an_event_page_names_the_runs_it_woke_started_and_cancelled(
    dash: FlowKeeper, client: httpx.AsyncClient
) -> None:
    waiting = (await dash.trigger("closing", 9)).run_id
    dripping = (await dash.trigger("drip", {"order": 9})).run_id
    bystander = (await dash.trigger("closing", 10)).run_id
    await wait_for(lambda: _is(dash, waiting, "waiting"))
    await wait_for(lambda: _is(dash, dripping, "sleeping"))
    await wait_for(lambda: _is(dash, bystander, "waiting"))

    sent = await dash.send_event("order.closed", {"order": 9})
    assert sent.woken == [waiting] and sent.cancelled == [dripping] and len(sent.started) == 1
    await dash.result(waiting, timeout=10)
    await dash.result(sent.started[0], timeout=10)

    data = (await client.get(f"{UI}/api/events/{sent.id}")).json()
    assert data["number"] == sent.id and data["name"] == "order.closed"
    assert data["data"] == {"order": 9} and data["sent_by_run"] is None
    assert (data["woke"], data["started"], data["cancelled"]) == (1, 1, 1)
    effects = {e["outcome"]: e for e in data["effects"]}
    assert set(effects) == {"woke", "started", "cancelled"}
    assert effects["woke"]["run_id"] == waiting and effects["woke"]["wait"] == "closed"
    assert effects["woke"]["workflow"] == "closing"
    assert effects["woke"]["status"] == "completed"
    assert effects["cancelled"]["run_id"] == dripping
    assert effects["cancelled"]["status"] == "cancelled"
    assert effects["started"]["run_id"] == sent.started[0]
    assert effects["started"]["workflow"] == "close-out"
    assert all(e["run_id"] != bystander for e in data["effects"])

    listed = (await client.get(f"{UI}/api/events")).json()["events"][0]
    assert (listed["woke"], listed["started"], listed["cancelled"]) == (1, 1, 1)
    page = await client.get(f"{UI}/events/{sent.id}")
    assert page.status_code == 200 and 'data-page="event"' in page.text
    assert _page_data(page.text)["effects"] == data["effects"]

    # An event sent by a workflow (ctx.send_event) names its run.
    announcer = (await dash.trigger("announcer")).run_id
    await dash.result(announcer, timeout=10)
    [announced] = (await client.get(f"{UI}/api/events", params={"name": "order.announced"})).json()[
        "events"
    ]
    assert announced["sent_by_run"] == announcer
    detail = (await client.get(f"{UI}/api/events/{announced['number']}")).json()
    assert detail["sent_by_run"] == announcer and detail["effects"] == []

    missing = await client.get(f"{UI}/api/events/{sent.id + 1000}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "event_not_found"
    assert "never sent" in missing.json()["error"]["message"]
    page = await client.get(f"{UI}/events/{sent.id + 1000}")
    assert page.status_code == 404 and "never sent" in _page_data(page.text)["missing"]


HOSTILE_EVENT_QUERIES = [
    ("name=a%00b", "NUL"),
    ("name=%ED%A0%80", None),  # decoded with replacement characters: matches nothing
    ("id=%00", "NUL"),
    ("name=" + "n" * 201, "no event has one longer than 200"),
    ("id=" + "i" * 513, "no event has one longer than 512"),
    ("name=" + "n" * 20_000, "longer than"),
    ("before=abc", "whole number"),
    ("before=-1", "whole number"),
    ("before=0", "between 1 and"),
    ("before=1.5", "whole number"),
    ("before=99999999999999999999", "whole number"),
    ("before=9223372036854775808", "between 1 and"),
    ("before=%00", "whole number"),
    ("before=%EF%BC%91", "whole number"),  # a full-width digit
    ("limit=0", "between 1 and 200"),
    ("limit=201", "between 1 and 200"),
    ("limit=x", "whole number"),
    ("limit=" + "9" * 5000, "whole number"),
]


@pytest.mark.parametrize(("query", "message"), HOSTILE_EVENT_QUERIES)
async def test_hostile_event_filters_are_400_with_a_message(
    dash: FlowKeeper, client: httpx.AsyncClient, query: str, message: str | None
) -> None:
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    headers = [(b"cookie", cookie.encode())]
    port = dash.test_port  # type: ignore[attr-defined]
    api = await asyncio.to_thread(raw_request, port, "GET", f"{UI}/api/events?{query}", headers)
    page = await asyncio.to_thread(raw_request, port, "GET", f"{UI}/events?{query}", headers)
    if message is None:
        assert api.status in (200, 400) and page.status == api.status
        return
    assert api.status == 400, (api.status, api.body[:300])
    error = api.json()["error"]
    assert error["code"] == "invalid" and message in error["message"]
    assert page.status == 400
    shown = re.search(rb'id="fk-data">(.*?)</script>', page.body, re.S)
    assert shown and message in json.loads(shown.group(1))["error"]


@pytest.mark.parametrize(
    "number", ["abc", "0", "-3", "1.0", "%00", "%ED%A0%80", "9" * 40, "9223372036854775808"]
)
async def test_hostile_event_numbers_are_400(
    dash: FlowKeeper, client: httpx.AsyncClient, number: str
) -> None:
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    headers = [(b"cookie", cookie.encode())]
    port = dash.test_port  # type: ignore[attr-defined]
    api = await asyncio.to_thread(raw_request, port, "GET", f"{UI}/api/events/{number}", headers)
    assert api.status == 400, (api.status, api.body[:300])
    assert api.json()["error"]["code"] == "invalid"
    page = await asyncio.to_thread(raw_request, port, "GET", f"{UI}/events/{number}", headers)
    assert page.status == 400, (page.status, page.body[:300])


async def test_the_events_pages_need_a_session(dash: FlowKeeper) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{dash.test_port}") as c:  # type: ignore[attr-defined]
        assert (await c.get(f"{UI}/api/events")).status_code == 401
        assert (await c.get(f"{UI}/api/events/1")).status_code == 401
        page = await c.get(f"{UI}/events", follow_redirects=False)
        assert page.status_code == 303 and "/login?next=" in page.headers["location"]


# the CLI -------------------------------------------------------------------------------------
async def _cli(
    capsys: pytest.CaptureFixture[str], database_url: str, *argv: str
) -> tuple[int, str, str]:
    """Run the CLI in a thread (it has its own event loop), as a user would."""
    code = await asyncio.to_thread(main, [*argv, "--database-url", database_url])
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_send_list_show_and_runs_show_with_waits(
    dash: FlowKeeper,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FLOWKEEPER_SIGNING_KEY", raising=False)
    monkeypatch.delenv("FLOWKEEPER_ENDPOINT", raising=False)
    run_id = (await dash.trigger("pay", 42)).run_id
    await wait_for(lambda: _is(dash, run_id, "waiting"))

    code, out, _ = await _cli(capsys, database_url, "runs", "show", run_id)
    assert code == 0
    assert "status    waiting" in out
    assert "waiting   for invoice.paid {order_id: 42} until " in out
    [row] = [line for line in out.splitlines() if line.startswith("paid ")][:1]
    assert row.split()[:3] == ["paid", "invoice.paid", "{order_id:"]
    assert "waiting" in row and row.rstrip().endswith("-")
    assert "= wait" in out  # the text timeline's legend

    # Bad input: a clear message and exit status 2, nothing sent.
    code, _, err = await _cli(capsys, database_url, "events", "send", "x", "--data", "{a:1}")
    assert code == 2 and "--data is not valid JSON" in err and "--data '{" in err
    code, _, err = await _cli(
        capsys, database_url, "events", "send", "x", "--data", '{"s": "\\u0000"}'
    )
    assert code == 2 and "NUL" in err
    code, _, err = await _cli(capsys, database_url, "events", "send", "", "--data", "{}")
    assert code == 2 and "non-empty" in err
    assert (await dash.event_page()).events == []

    # No signing key here: the woken run is left due for the scheduler.
    code, out, _ = await _cli(
        capsys,
        database_url,
        "events",
        "send",
        "invoice.paid",
        "--data",
        '{"order_id": 42, "amount": 5}',
        "--id",
        "inv-42",
    )
    assert code == 0, out
    [sent] = (await dash.event_page()).events
    assert out.splitlines()[0] == f"event {sent.id} sent: invoice.paid"
    assert f"woke 1 run:\n  {run_id}\n" in out and "started 0 runs" in out
    assert "cancelled 0 runs" in out and "due for the next scheduler tick" in out
    await dash.tick()
    assert await dash.result(run_id, timeout=10) == {"paid": {"order_id": 42, "amount": 5}}

    code, out, _ = await _cli(
        capsys, database_url, "events", "send", "invoice.paid", "--data", "{}", "--id", "inv-42"
    )
    assert code == 0 and "sent already, as event" in out and "duplicate" in out
    code, out, _ = await _cli(
        capsys, database_url, "events", "send", "ping", "--json"
    )  # no --data: null
    assert code == 0
    ping = json.loads(out)
    assert ping["duplicate"] is False and ping["woken"] == []

    code, out, _ = await _cli(capsys, database_url, "events", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["NUMBER", "NAME", "ID"]
    assert [line.split()[0] for line in lines[1:]] == [str(ping["number"]), str(sent.id)]
    assert lines[2].split()[1:3] == ["invoice.paid", "inv-42"]
    code, out, _ = await _cli(capsys, database_url, "events", "list", "--limit", "1")
    assert f"--before {ping['number']}" in out
    code, out, _ = await _cli(capsys, database_url, "events", "list", "--id", "inv-42", "--json")
    assert [e["number"] for e in json.loads(out)["events"]] == [sent.id]
    code, out, _ = await _cli(capsys, database_url, "events", "list", "--name", "nope")
    assert code == 0 and "no events match" in out
    code, _, err = await _cli(capsys, database_url, "events", "list", "--before", "x")
    assert code == 1 and "whole number" in err

    code, out, _ = await _cli(capsys, database_url, "events", "show", str(sent.id))
    assert code == 0
    assert f"event     {sent.id}" in out and "id        inv-42" in out
    assert "effect    woke 1, started 0, cancelled 0" in out
    assert '"amount": 5' in out
    [effect] = [line for line in out.splitlines() if line.startswith("woke ")]
    assert effect.split()[:4] == ["woke", run_id, "pay", "completed"]
    code, out, _ = await _cli(capsys, database_url, "events", "show", f"#{sent.id}", "--json")
    assert json.loads(out)["effects"][0]["run_id"] == run_id
    code, _, err = await _cli(capsys, database_url, "events", "show", "99999")
    assert code == 1 and "No event number 99999" in err
    code, _, err = await _cli(capsys, database_url, "events", "show", "abc")
    assert code == 1 and "whole number" in err

    # runs show: the wait, resolved by that event.
    code, out, _ = await _cli(capsys, database_url, "runs", "show", run_id)
    [row] = [line for line in out.splitlines() if line.startswith("paid ")][:1]
    assert "completed" in row and row.rstrip().endswith(f"#{sent.id}")
    code, out, _ = await _cli(capsys, database_url, "runs", "show", run_id, "--json")
    assert json.loads(out)["waits"][0]["event_number"] == sent.id


async def test_cli_send_starts_on_event_workflows_with_app(
    dash: FlowKeeper,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys
    import types

    # The app's own FlowKeeper, as --app imports it (the CLI closes it when done).
    app = make_fk(database_url, port=dash.test_port)  # type: ignore[attr-defined]
    _workflows(app)
    module = types.ModuleType("fk_events_ui_app")
    module.fk = app  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fk_events_ui_app", module)
    code, out, _ = await _cli(
        capsys, database_url, "events", "send", "order.closed", "--data", '{"order": 1}'
    )
    assert code == 0 and "started 0 runs" in out and "--app module:fk" in out
    code = await asyncio.to_thread(
        main,
        [
            "events",
            "send",
            "order.closed",
            "--data",
            '{"order": 2}',
            "--app",
            "fk_events_ui_app:fk",
        ],
    )
    out, _ = capsys.readouterr()
    assert code == 0 and "started 1 run:" in out and "pushed to the endpoint" in out
    started = out.split("started 1 run:\n  ", 1)[1].split()[0]
    assert await dash.result(started, timeout=10) == "closed 2"
