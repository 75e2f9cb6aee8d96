"""Cron workflows: one run per slot however many drivers fire, DST, catch-up, reconcile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from flowkeeper import ConfigurationError, Context, FlowKeeper
from flowkeeper.testing import FakeClock

from ..helpers import make_fk, serve


@pytest.fixture
async def clock(conn: asyncpg.Connection, fk: FlowKeeper) -> FakeClock:
    await fk.store.ensure_schema()
    return await FakeClock(conn).install()


@pytest.fixture
async def other(database_url: str) -> AsyncIterator[FlowKeeper]:
    """A second driver on the same database (another process, in effect)."""
    instance = make_fk(database_url)
    try:
        yield instance
    finally:
        await instance.aclose()


def declare(fk: FlowKeeper, name: str, cron: str, tz: str, catch_up: str = "latest") -> None:
    @fk.workflow(name, cron=cron, timezone=tz, catch_up=catch_up)
    async def scheduled(ctx: Context, slot: datetime) -> str:
        return slot.isoformat()


async def walk(
    clock: FakeClock,
    drivers: list[FlowKeeper],
    start: datetime,
    end: datetime,
    step: timedelta = timedelta(minutes=10),
) -> None:
    """Move the clock from start to end, every driver firing at each step at once."""
    at = start
    while at <= end:
        await clock.travel_to(at)
        await asyncio.gather(*(d.schedules.fire_due() for d in drivers))
        at += step


async def slots(conn: asyncpg.Connection, workflow: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT input::text AS input, idempotency_key FROM flowkeeper.runs WHERE workflow = $1 "
        "ORDER BY idempotency_key",
        workflow,
    )
    for r in rows:  # the key is the slot in UTC, the input the slot in the schedule's zone
        slot = datetime.fromisoformat(r["input"].strip('"'))
        assert r["idempotency_key"] == "cron:" + slot.astimezone(UTC).isoformat()
    return [r["input"].strip('"') for r in rows]


async def test_spring_forward_fires_the_skipped_slot_once_after_the_gap(
    fk: FlowKeeper, other: FlowKeeper, clock: FakeClock, conn: asyncpg.Connection
) -> None:
    declare(fk, "digest", "30 2 * * *", "Europe/Berlin")
    await clock.travel_to(datetime(2026, 3, 27, 12, tzinfo=UTC))
    await fk.reconcile()
    await walk(
        clock,
        [fk, other],
        datetime(2026, 3, 27, 12, tzinfo=UTC),
        datetime(2026, 3, 30, 6, tzinfo=UTC),
    )
    assert await slots(conn, "digest") == [
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",  # 02:30 does not exist that night: first minute after
        "2026-03-30T02:30:00+02:00",
    ]


async def test_fall_back_fixed_hour_once_wildcard_hour_twice(
    fk: FlowKeeper, other: FlowKeeper, clock: FakeClock, conn: asyncpg.Connection
) -> None:
    declare(fk, "nightly", "30 2 * * *", "Europe/Berlin")
    declare(fk, "hourly", "0 * * * *", "Europe/Berlin")
    start = datetime(2026, 10, 24, 20, tzinfo=UTC)
    await clock.travel_to(start)
    await fk.reconcile()
    await walk(
        clock, [fk, other], start, datetime(2026, 10, 25, 4, tzinfo=UTC), timedelta(minutes=7)
    )
    assert await slots(conn, "nightly") == ["2026-10-25T02:30:00+02:00"]
    assert sorted(await slots(conn, "hourly"), key=datetime.fromisoformat) == [
        "2026-10-24T23:00:00+02:00",
        "2026-10-25T00:00:00+02:00",
        "2026-10-25T01:00:00+02:00",
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:00:00+01:00",  # the repeated hour: a wildcard hour fires twice
        "2026-10-25T03:00:00+01:00",
        "2026-10-25T04:00:00+01:00",
    ]


@pytest.mark.parametrize(
    ("catch_up", "fired", "skipped"),
    [
        ("all", ["10:00", "11:00", "12:00"], 0),
        ("latest", ["12:00"], 2),
        ("none", [], 3),
    ],
)
async def test_three_hour_outage_follows_the_catch_up_policy(
    fk: FlowKeeper,
    other: FlowKeeper,
    clock: FakeClock,
    conn: asyncpg.Connection,
    catch_up: str,
    fired: list[str],
    skipped: int,
) -> None:
    declare(fk, "report", "0 * * * *", "UTC", catch_up)
    start = datetime(2026, 6, 1, 8, 30, tzinfo=UTC)
    await clock.travel_to(start)
    await fk.reconcile()
    await walk(clock, [fk, other], start, datetime(2026, 6, 1, 9, 30, tzinfo=UTC))
    before = await slots(conn, "report")
    assert before == ["2026-06-01T09:00:00+00:00"]
    # Nobody ticks from 09:30 until 12:20: the 10:00, 11:00 and 12:00 slots are missed.
    await walk(
        clock,
        [fk, other],
        datetime(2026, 6, 1, 12, 20, tzinfo=UTC),
        datetime(2026, 6, 1, 12, 40, tzinfo=UTC),
    )
    after = await slots(conn, "report")
    assert after[1:] == [f"2026-06-01T{t}:00+00:00" for t in fired]
    (info,) = await fk.schedules.list()
    assert info.skipped == skipped
    assert info.fired == 1 + len(fired)
    assert info.next_at == datetime(2026, 6, 1, 13, tzinfo=UTC)


async def test_reconcile_pause_resume_run_now_and_removal(
    fk: FlowKeeper, database_url: str, clock: FakeClock, conn: asyncpg.Connection
) -> None:
    declare(fk, "digest", "0 9 * * MON-FRI", "Europe/Berlin")
    await clock.travel_to(datetime(2026, 6, 1, 6, tzinfo=UTC))  # a Monday
    await fk.reconcile()
    (info,) = await fk.schedules.list()
    assert info.state == "active"
    assert info.next_at == datetime(2026, 6, 1, 7, tzinfo=UTC)  # 09:00 CEST
    # Deploying again (unchanged) keeps next_at; a pause stops firing.
    await fk.reconcile()
    await fk.schedules.pause("digest")
    await clock.travel_to(datetime(2026, 6, 1, 7, 5, tzinfo=UTC))
    assert await fk.schedules.fire_due() == []
    following = await fk.schedules.resume("digest")
    assert following == datetime(2026, 6, 2, 7, tzinfo=UTC)  # the paused slot is not caught up
    run_id = await fk.schedules.run_now("digest")
    assert (await fk.get_run(run_id)).input.startswith("2026-06-01T09:05")
    # A new deploy without the cron workflow stops it.
    later = make_fk(database_url)
    try:

        @later.workflow("digest")
        async def digest(ctx: Context, slot: datetime) -> None:
            return None

        await later.reconcile()
        (info,) = await later.schedules.list()
        assert info.state == "removed" and info.next_at is None
        with pytest.raises(Exception, match="removed"):
            await later.schedules.resume("digest")
    finally:
        await later.aclose()


async def test_a_cron_run_executes_with_its_slot_as_input(
    fk: FlowKeeper, clock: FakeClock, conn: asyncpg.Connection
) -> None:
    seen: list[datetime] = []

    @fk.workflow("tz", cron="*/5 * * * *", timezone="America/New_York")
    async def tz(ctx: Context, slot: datetime) -> None:
        seen.append(slot)

    await clock.travel_to(datetime(2026, 6, 1, 11, 58, tzinfo=UTC))
    async with serve(fk):
        await fk.tick()  # reconciles (this process declares it) and fires nothing yet
        await clock.travel_to(datetime(2026, 6, 1, 12, 1, tzinfo=UTC))
        await fk.tick()  # fires the 08:00 New York slot and dispatches it
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.1)
    assert seen == [datetime(2026, 6, 1, 12, tzinfo=UTC)]  # 08:00 in New York
    assert seen[0].utcoffset() == timedelta(hours=-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": "61 * * * *"}, "invalid cron expression"),
        ({"cron": "* * *"}, "invalid cron expression"),
        ({"cron": ""}, "cron expression"),
        ({"cron": "0 9 * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"cron": "0 9 * * *", "catch_up": "some"}, "catch_up"),
        ({"timezone": "UTC"}, "only apply with cron"),
    ],
)
def test_bad_schedules_fail_at_decoration(
    fk: FlowKeeper, kwargs: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):

        @fk.workflow("bad", **kwargs)  # type: ignore[arg-type]
        async def bad(ctx: Context, slot: datetime) -> None:
            return None

    assert "bad" not in fk.registry


def test_a_cron_workflow_must_take_its_slot_time(fk: FlowKeeper) -> None:
    with pytest.raises(ConfigurationError, match="annotate it as datetime"):

        @fk.workflow("wrong", cron="0 9 * * *")
        async def wrong(ctx: Context, n: int) -> None:
            return None


async def test_cli_schedules_and_status(fk: FlowKeeper, database_url: str) -> None:
    from .test_scheduler import _cli

    declare(fk, "digest", "0 9 * * *", "Europe/Berlin")
    await fk.reconcile()
    env = {"DATABASE_URL": database_url}
    listed = await asyncio.to_thread(_cli, "schedules", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "digest" in listed.stdout and "0 9 * * *" in listed.stdout and "active" in listed.stdout
    paused = await asyncio.to_thread(_cli, "schedules", "pause", "digest", env=env)
    assert paused.returncode == 0 and "paused" in paused.stdout
    assert (await fk.schedules.list())[0].paused
    resumed = await asyncio.to_thread(_cli, "schedules", "resume", "digest", env=env)
    assert resumed.returncode == 0 and "next slot" in resumed.stdout
    started = await asyncio.to_thread(_cli, "schedules", "run-now", "digest", env=env)
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.split()[2]
    assert (await fk.get_run(run_id)).workflow == "digest"
    missing = await asyncio.to_thread(_cli, "schedules", "pause", "nope", env=env)
    assert missing.returncode == 1 and "No schedule for workflow 'nope'" in missing.stderr
    status = await asyncio.to_thread(_cli, "status", env=env)
    assert status.returncode == 0, status.stderr
    assert "on disk" in status.stdout
    assert any(line.split()[:2] == ["runs", "1"] for line in status.stdout.splitlines())
