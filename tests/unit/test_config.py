from __future__ import annotations

import pytest

from flowkeeper import ConfigurationError, FlowKeeper
from flowkeeper.db import parse_database_url
from flowkeeper.sql import load_queries, migrations, validate_schema


@pytest.mark.parametrize(
    ("url", "pooled"),
    [
        ("postgresql://u:p@localhost:5432/db", False),
        ("postgres://u:p@db.example.com/db", False),
        ("postgresql://postgres.abc:pw@aws-0-eu.pooler.supabase.com:6543/postgres", True),
        ("postgresql://u:p@ep-cool-123-pooler.eu-central-1.aws.neon.tech/db", True),
        ("postgresql://u:p@host:6543/db", True),
        ("postgresql://u:p@host:5432/db?pgbouncer=true", True),
        ("postgresql://u:p@host:5432/db?flowkeeper_pooled=1&sslmode=require", True),
    ],
)
def test_pooler_detection(url: str, pooled: bool) -> None:
    clean, detected = parse_database_url(url)
    assert detected is pooled
    assert "pgbouncer" not in clean
    assert "flowkeeper_pooled" not in clean
    assert clean.startswith("postgresql://")


STRONG = "unit-test-signing-key-0123456789abcdef"
NEW = "new-signing-key-0123456789abcdefghij"
OLD = "old-signing-key-0123456789abcdefghij"


def test_other_url_parameters_are_kept() -> None:
    clean, _ = parse_database_url("postgresql://h/db?sslmode=require&pgbouncer=true")
    assert clean.endswith("?sslmode=require")


def test_bad_urls() -> None:
    with pytest.raises(ConfigurationError, match="postgresql://"):
        parse_database_url("mysql://h/db")
    with pytest.raises(ConfigurationError):
        parse_database_url("")


@pytest.mark.parametrize("schema", ["flowkeeper", "fk_2", "_x"])
def test_valid_schemas(schema: str) -> None:
    assert validate_schema(schema) == schema
    assert all(schema in q for q in load_queries(schema).values() if "{" not in q)


@pytest.mark.parametrize("schema", ["", "Flow", "a-b", "x; drop table y", "pg_catalog", "a" * 64])
def test_invalid_schemas(schema: str) -> None:
    with pytest.raises(ConfigurationError, match=r"(?i)schema"):
        validate_schema(schema)


def test_queries_have_no_unreplaced_placeholders() -> None:
    for name, query in load_queries("fk").items():
        assert "{schema}" not in query, name


def test_migrations_are_numbered_without_gaps() -> None:
    assert [m.version for m in migrations()] == list(range(1, len(migrations()) + 1))


def test_constructor_needs_url_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DATABASE_URL", "FLOWKEEPER_DATABASE_URL", "FLOWKEEPER_SIGNING_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigurationError, match="DATABASE_URL"):
        FlowKeeper()
    with pytest.raises(ConfigurationError, match="FLOWKEEPER_SIGNING_KEY"):
        FlowKeeper("postgresql://localhost/db")
    with pytest.raises(ConfigurationError, match="endpoint URL"):
        FlowKeeper("postgresql://localhost/db", STRONG, "ftp://x")


def test_constructor_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://localhost/app")
    monkeypatch.setenv("FLOWKEEPER_SIGNING_KEY", f"{NEW}, {OLD}")
    monkeypatch.setenv("FLOWKEEPER_ENDPOINT", "https://shop.example/api/flowkeeper/")
    fk = FlowKeeper()
    assert fk.dispatcher is not None
    assert fk.dispatcher.endpoint == "https://shop.example/api/flowkeeper"
    assert fk.dispatcher.base_path == "/api/flowkeeper"
    headers = fk.signer.sign(method="POST", path="/", body=b"")
    from flowkeeper.signing import RequestSigner

    RequestSigner(NEW).verify(method="POST", paths=["/"], body=b"", headers=headers)


def test_constructing_does_no_io() -> None:
    # An unreachable database and endpoint: construction and app building still succeed.
    fk = FlowKeeper("postgresql://nobody@127.0.0.1:1/none", STRONG, "http://127.0.0.1:1/api/fk")
    app = fk.asgi()
    assert app is not None
    assert fk.db._slots is None and not fk.db._idle
