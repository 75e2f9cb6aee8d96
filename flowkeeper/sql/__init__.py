"""SQL as package data: named queries and versioned migrations, loaded in one place."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

from ..errors import ConfigurationError

__all__ = [
    "QUERY_FILES",
    "Migration",
    "load_queries",
    "migrations",
    "parse_queries",
    "validate_schema",
]

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_NAME_RE = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# A migration that older libraries cannot live with says so (see flowkeeper/migrations.py).
_REQUIRES_RE = re.compile(r"^-- requires-library-schema: (\d+)\s*$", re.MULTILINE)


def validate_schema(schema: str) -> str:
    """Schema names are spliced into SQL, so only plain identifiers are allowed."""
    if not isinstance(schema, str) or not _SCHEMA_RE.match(schema):
        raise ConfigurationError(
            f"Invalid schema name {schema!r}: use lower-case letters, digits and underscores, "
            "starting with a letter or underscore, at most 63 characters."
        )
    if schema.startswith("pg_") or schema == "information_schema":
        raise ConfigurationError(f"Schema name {schema!r} is reserved by PostgreSQL.")
    return schema


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


#: The named-query files, each a run of "-- name: <name>" blocks (pgcron.sql,
#: installed as a whole by ``flowkeeper pgcron``, is loaded by flowkeeper.pgcron).
QUERY_FILES = (
    "queries.sql",
    "deploys.sql",
    "events.sql",
    "streams.sql",
    "children.sql",
    "transactions.sql",
    "patches.sql",
    "fork.sql",
    "steplogs.sql",
    "health.sql",
    "schedules.sql",
    "flowcontrol.sql",
    "retention.sql",
    "steprates.sql",
)


def parse_queries(files: dict[str, str]) -> dict[str, str]:
    """Named queries from ``{file name: text}``; a name defined twice is an error."""
    queries: dict[str, str] = {}
    origin: dict[str, str] = {}
    for filename, text in files.items():
        parts = _NAME_RE.split(text)
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in queries:
                where = (
                    f"twice in {filename}"
                    if origin[name] == filename
                    else f"in both {origin[name]} and {filename}"
                )
                raise RuntimeError(f"query {name!r} is defined {where}")
            queries[name] = body.strip().rstrip(";")
            origin[name] = filename
    return queries


@functools.lru_cache(maxsize=8)
def _raw_queries() -> dict[str, str]:
    return parse_queries({name: _read(name) for name in QUERY_FILES})


@functools.lru_cache(maxsize=8)
def load_queries(schema: str) -> dict[str, str]:
    """Every named query of the files in ``QUERY_FILES``, with the schema spliced in."""
    validate_schema(schema)
    return {name: q.replace("{schema}", schema) for name, q in _raw_queries().items()}


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    template: str

    def sql(self, schema: str) -> str:
        return self.template.replace("{schema}", validate_schema(schema))

    @property
    def requires_library(self) -> int:
        """The lowest schema version a library must know to use a schema with this applied.

        1 for an additive migration (the default): every library that checks
        compatibility keeps working.  A migration that drops, renames or
        narrows something declares ``-- requires-library-schema: <its version>``.
        """
        match = _REQUIRES_RE.search(self.template)
        return int(match.group(1)) if match else 1


@functools.lru_cache(maxsize=1)
def migrations() -> tuple[Migration, ...]:
    """All migrations shipped with the package, in version order."""
    found: list[Migration] = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _MIGRATION_RE.match(entry.name)
        if match:
            found.append(
                Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8"))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration versions must be 1..n without gaps, got {versions}")
    return tuple(found)
