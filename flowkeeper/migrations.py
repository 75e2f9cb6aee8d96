"""Versioned schema migrations, applied under an advisory lock, and rolling upgrades.

All pending migrations run in one transaction holding a transaction-scoped
advisory lock (safe behind transaction poolers), so processes starting
together apply each migration once and never see a half-built schema.

Rolling upgrades: a deploy whose new version adds a migration runs it while
instances of the previous deploy still serve (a Lambda cold-starting on the
old code after the migration ran).  Migrations are additive within a minor
version (new tables, new nullable columns, wider constraints), so the old
code keeps working.  Each applied migration records, in the schema's
``migrations`` table, the lowest schema version a library must know to use
the schema (``requires_library``; 1 for an additive migration).  A library
that finds a schema newer than it knows accepts it when it knows at least
that version, and refuses it otherwise, naming both versions.  A newer row
without the record (unknown provenance) is taken as incompatible.
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


async def required_library(conn: asyncpg.Connection, schema: str, known: int) -> int:
    """The schema version a library must know to use ``schema``, given it knows ``known``.

    Only the migrations newer than ``known`` matter; one without a record
    counts as requiring itself (not compatible).
    """
    validate_schema(schema)
    has_column = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = $1 "
        "AND table_name = 'migrations' AND column_name = 'requires_library')",
        schema,
    )
    column = "requires_library" if has_column else "NULL::integer"
    value = await conn.fetchval(
        f"SELECT max(coalesce({column}, version)) FROM {schema}.migrations WHERE version > $1",
        known,
    )
    return int(value or 0)


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
            # The compatibility record (see the module docstring); 0.1 had no such column.
            await conn.execute(
                f"ALTER TABLE {schema}.migrations ADD COLUMN IF NOT EXISTS requires_library integer"
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
                    f"INSERT INTO {schema}.migrations (version, name, requires_library) "
                    "VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.requires_library,
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
