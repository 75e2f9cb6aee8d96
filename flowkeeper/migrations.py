"""Versioned schema migrations, applied under an advisory lock.

All pending migrations run in one transaction holding a transaction-scoped
advisory lock (safe behind transaction poolers), so processes starting
together apply each migration once and never see a half-built schema.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .errors import MigrationError
from .sql import migrations, validate_schema

if TYPE_CHECKING:
    import asyncpg

logger = logging.getLogger("flowkeeper")


def latest_version() -> int:
    return migrations()[-1].version


async def current_version(conn: asyncpg.Connection, schema: str) -> int:
    """The applied schema version, 0 when the schema does not exist yet."""
    validate_schema(schema)
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{schema}.migrations")
    if not exists:
        return 0
    version = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {schema}.migrations")
    return int(version)


async def migrate(conn: asyncpg.Connection, schema: str) -> list[int]:
    """Bring ``schema`` up to the latest version; return the versions applied."""
    import asyncpg

    validate_schema(schema)
    applied: list[int] = []
    try:
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                f"flowkeeper.migrate:{schema}",
            )
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            await conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {schema}.migrations (
                        version    integer PRIMARY KEY,
                        name       text NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {
                r["version"] for r in await conn.fetch(f"SELECT version FROM {schema}.migrations")
            }
            for migration in migrations():
                if migration.version in done:
                    continue
                logger.info(
                    "applying flowkeeper migration %04d_%s to schema %s",
                    migration.version,
                    migration.name,
                    schema,
                )
                await conn.execute(migration.sql(schema))
                await conn.execute(
                    f"INSERT INTO {schema}.migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
                applied.append(migration.version)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise MigrationError(
            f"Not allowed to create or change schema {schema!r}: {exc}. Run "
            "`flowkeeper migrate` once as a role that may create schemas, or grant CREATE "
            "on the database to this role."
        ) from exc
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"Migrating schema {schema!r} failed: {exc}") from exc
    return applied
