"""``--every`` and ``--schedule`` checked against the installed pg_cron version."""

from __future__ import annotations

import pytest

from flowkeeper import ConfigurationError
from flowkeeper.pgcron import cron_schedule, parse_version, sql_blocks

V14, V15 = (1, 4), (1, 5)


@pytest.mark.parametrize(
    ("text", "version"),
    [("1.4-1", (1, 4)), ("1.4", (1, 4)), ("1.6.7", (1, 6)), ("10.2", (10, 2)), ("", (0, 0))],
)
def test_parse_version(text: str, version: tuple[int, int]) -> None:
    assert parse_version(text) == version


@pytest.mark.parametrize(
    ("every", "schedule"),
    [
        (None, "* * * * *"),
        ("1m", "* * * * *"),
        ("60s", "* * * * *"),
        ("5m", "*/5 * * * *"),
        ("15 minutes", "*/15 * * * *"),
        ("30min", "*/30 * * * *"),
        ("1h", "0 * * * *"),
        ("60m", "0 * * * *"),
        ("6 hours", "0 */6 * * *"),
    ],
)
def test_every_translates_to_cron(every: str | None, schedule: str) -> None:
    assert cron_schedule(every=every, version=V14) == schedule


def test_seconds_need_pg_cron_1_5() -> None:
    assert cron_schedule(every="10s", version=V15) == "10 seconds"
    assert cron_schedule(every="59 seconds", version=(1, 6)) == "59 seconds"
    with pytest.raises(ConfigurationError) as err:
        cron_schedule(every="10s", version=V14)
    message = str(err.value)
    assert "pg_cron is 1.4" in message
    assert "by the minute" in message
    assert "every five *minutes*" in message  # why: 1.4 misreads six fields silently
    assert "flowkeeper scheduler" in message  # what to do instead


@pytest.mark.parametrize("every", ["90s", "7m", "45m", "5h", "0m", "soon", "1d"])
def test_intervals_cron_cannot_repeat_evenly_are_refused(every: str) -> None:
    with pytest.raises(ConfigurationError, match="--every"):
        cron_schedule(every=every, version=V15)


def test_explicit_schedules() -> None:
    assert cron_schedule(schedule="*/2  * * * *", version=V14) == "*/2 * * * *"
    assert cron_schedule(schedule="0 3 * * MON-FRI", version=V14) == "0 3 * * MON-FRI"
    assert cron_schedule(schedule="@hourly", version=V14) == "@hourly"
    assert cron_schedule(schedule="30 seconds", version=V15) == "30 seconds"
    with pytest.raises(ConfigurationError, match=r"1\.4"):
        cron_schedule(schedule="30 seconds", version=V14)
    with pytest.raises(ConfigurationError, match="every five"):
        cron_schedule(schedule="*/5 * * * * *", version=V14)
    with pytest.raises(ConfigurationError, match="six-field"):
        cron_schedule(schedule="*/5 * * * * *", version=V15)
    with pytest.raises(ConfigurationError, match="five-field"):
        cron_schedule(schedule="* * *", version=V15)
    with pytest.raises(ConfigurationError, match="five-field"):
        cron_schedule(schedule="* * * * ; drop table x", version=V15)


def test_sql_blocks_are_complete_and_schema_bound() -> None:
    blocks = sql_blocks("fk_app")
    assert set(blocks) == {"core", "pg_net", "plpython", "uninstall"}
    for name, text in blocks.items():
        assert "{schema}" not in text, name
        # Every object is in the configured schema ("flowkeeper.v1" is the signing salt).
        assert "flowkeeper." not in text.replace("flowkeeper.v1", ""), name
    with pytest.raises(ConfigurationError):
        sql_blocks("bad-schema")
