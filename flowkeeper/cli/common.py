"""Options shared by the commands: where the database and the endpoint are."""

from __future__ import annotations

import argparse
import importlib
import os
import secrets
from typing import Any

from ..client import FlowKeeper
from ..errors import ConfigurationError


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 run``, ``2 runs`` (``many`` for irregular words)."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def add_connection_options(parser: argparse.ArgumentParser, *, endpoint: bool = True) -> None:
    group = parser.add_argument_group("connection (default: environment variables)")
    group.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="import a FlowKeeper object from your code instead, e.g. myapp.workflows:fk",
    )
    group.add_argument("--database-url", help="Postgres URL (DATABASE_URL)")
    group.add_argument("--schema", help="flowkeeper schema (FLOWKEEPER_SCHEMA, default flowkeeper)")
    if endpoint:
        group.add_argument("--endpoint", help="public URL of the endpoint (FLOWKEEPER_ENDPOINT)")
        group.add_argument("--signing-key", help="signing key (FLOWKEEPER_SIGNING_KEY)")


def load_app(spec: str) -> FlowKeeper:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"--app must look like module:attribute, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} for --app: {exc}") from exc
    obj = getattr(module, attr, None)
    if not isinstance(obj, FlowKeeper):
        raise ConfigurationError(f"{spec} is not a FlowKeeper object")
    return obj


def flowkeeper_from_args(args: argparse.Namespace, *, need_endpoint: bool = False) -> FlowKeeper:
    """A FlowKeeper built from --app, or from the options and the environment."""
    if getattr(args, "app", None):
        return load_app(args.app)
    kwargs: dict[str, Any] = {
        "database_url": args.database_url,
        "schema": args.schema or os.environ.get("FLOWKEEPER_SCHEMA") or "flowkeeper",
    }
    key = getattr(args, "signing_key", None) or os.environ.get("FLOWKEEPER_SIGNING_KEY")
    endpoint = getattr(args, "endpoint", None) or os.environ.get("FLOWKEEPER_ENDPOINT")
    if need_endpoint and not endpoint:
        raise ConfigurationError(
            "No endpoint configured: pass --endpoint https://your.app/api/flowkeeper or set "
            "FLOWKEEPER_ENDPOINT."
        )
    # Commands that only touch the database need no key; use a throw-away one.
    kwargs["signing_key"] = [k for k in (key or "").split(",") if k.strip()] or (
        secrets.token_urlsafe(32)
    )
    if need_endpoint and not key:
        raise ConfigurationError(
            "No signing key configured: pass --signing-key or set FLOWKEEPER_SIGNING_KEY "
            "(the endpoint refuses unsigned invocations)."
        )
    kwargs["endpoint"] = endpoint
    return FlowKeeper(**kwargs)


def flowkeeper_for_actions(args: argparse.Namespace) -> FlowKeeper:
    """:func:`flowkeeper_from_args` for commands that wake or start runs.

    Without the signing key a push to the endpoint would be refused, so the
    runs such a command makes due are left for the scheduler instead.
    """
    fk = flowkeeper_from_args(args)
    if not getattr(args, "app", None) and not (
        getattr(args, "signing_key", None) or os.environ.get("FLOWKEEPER_SIGNING_KEY")
    ):
        fk.dispatcher = None
        fk.events.push = None
    return fk
