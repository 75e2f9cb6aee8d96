"""Weak secrets are refused where they are configured, with the reason and the fix."""

from __future__ import annotations

import asyncio

import pytest

from flowkeeper import ConfigurationError, FlowKeeper
from flowkeeper.pgcron import PgCron
from flowkeeper.signing import MIN_KEY_LENGTH, MIN_PASSWORD_LENGTH

URL = "postgresql://nobody@127.0.0.1:1/none"
STRONG_KEY = "k" * MIN_KEY_LENGTH
GENERATE = "secrets.token_urlsafe(32)"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FLOWKEEPER_SIGNING_KEY", "FLOWKEEPER_DASHBOARD_PASSWORD"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(
    "key",
    ["x", "another-key", "k" * (MIN_KEY_LENGTH - 1), " " * 40 + "q7zv", [STRONG_KEY, "old"]],
)
def test_short_signing_keys_are_refused_with_the_fix(key: str | list[str]) -> None:
    with pytest.raises(ConfigurationError) as err:
        FlowKeeper(URL, signing_key=key)
    message = str(err.value)
    assert f"at least {MIN_KEY_LENGTH}" in message and GENERATE in message
    assert "allow_weak_secrets=True" in message
    if isinstance(key, list):
        assert "#2 of 2" in message
    else:
        assert key.strip() not in message  # never echoed


def test_whitespace_only_signing_key_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="empty"):
        FlowKeeper(URL, signing_key=" " * 40)


def test_weak_keys_from_the_environment_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWKEEPER_SIGNING_KEY", f"{STRONG_KEY},tiny")
    with pytest.raises(ConfigurationError, match="#2 of 2"):
        FlowKeeper(URL)


@pytest.mark.parametrize("password", ["p", "demo", "x" * (MIN_PASSWORD_LENGTH - 1), " " * 20])
def test_weak_dashboard_passwords_are_refused(
    password: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError) as err:
        FlowKeeper(URL, signing_key=STRONG_KEY, dashboard_password=password)
    message = str(err.value)
    assert f"at least {MIN_PASSWORD_LENGTH}" in message and GENERATE in message
    if not password.strip():
        assert "whitespace" in message
    monkeypatch.setenv("FLOWKEEPER_DASHBOARD_PASSWORD", password)
    with pytest.raises(ConfigurationError, match="dashboard password"):
        FlowKeeper(URL, signing_key=STRONG_KEY)


def test_strong_secrets_and_no_password_are_accepted() -> None:
    FlowKeeper(URL, signing_key=STRONG_KEY, dashboard_password="p" * MIN_PASSWORD_LENGTH)
    fk = FlowKeeper(URL, signing_key=STRONG_KEY, dashboard_password="")
    assert fk.dashboard_password is None  # empty: the dashboard is off, not weak


def test_the_escape_hatch_for_tests() -> None:
    fk = FlowKeeper(URL, signing_key="k", dashboard_password="pw", allow_weak_secrets=True)
    assert fk.dashboard_password == "pw"


def test_pgcron_install_refuses_a_weak_key_before_connecting() -> None:
    # Port 1 refuses connections: the key is checked first, so this is a ConfigurationError.
    with pytest.raises(ConfigurationError, match=f"at least {MIN_KEY_LENGTH}"):
        asyncio.run(PgCron(URL).install(endpoint="https://shop.example/api/fk", signing_key="k"))


def test_cli_refuses_a_weak_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowkeeper.cli import main

    monkeypatch.setenv("DATABASE_URL", URL)
    monkeypatch.setenv("FLOWKEEPER_SIGNING_KEY", "short")
    monkeypatch.setenv("FLOWKEEPER_ENDPOINT", "https://shop.example/api/fk")
    assert main(["tick"]) == 1
    assert f"at least {MIN_KEY_LENGTH}" in capsys.readouterr().err
