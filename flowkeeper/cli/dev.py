"""``flowkeeper dev APP``: a whole local setup in one command.

It uses ``DATABASE_URL`` or starts an embedded PostgreSQL under
``.flowkeeper/pg`` (kept between runs), makes a development signing key and
dashboard password once and remembers them in ``.flowkeeper/dev.json``, serves
the user's ASGI app with uvicorn (auto-reload on ``.py`` changes), and runs the
scheduler loop in a thread of this process so sleeps and retries resume.
Ctrl-C and SIGTERM stop all of it, the embedded PostgreSQL included.

The app reads its configuration from the environment (``FlowKeeper()`` with
no arguments), so this command sets ``DATABASE_URL``, ``FLOWKEEPER_SIGNING_KEY``,
``FLOWKEEPER_ENDPOINT`` and ``FLOWKEEPER_DASHBOARD_PASSWORD`` before it imports
the app; variables already set are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import ConfigurationError

STATE_DIR = ".flowkeeper"


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "dev",
        help="local development: database, keys, your app with auto-reload, a scheduler",
        description="Serve your ASGI app for local development: DATABASE_URL or an embedded "
        "PostgreSQL under .flowkeeper/pg, a remembered signing key, auto-reload, the "
        "scheduler loop and the dashboard. Ctrl-C or SIGTERM stops everything.",
    )
    parser.add_argument("app", metavar="APP", help="your ASGI app, e.g. shop.app:app")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    parser.add_argument(
        "--mount",
        default="/api/flowkeeper",
        help="path where your app mounts fk.asgi() (/api/flowkeeper)",
    )
    parser.add_argument(
        "--state-dir",
        default=STATE_DIR,
        help="folder for the embedded database and the dev secrets (.flowkeeper)",
    )
    parser.add_argument("--database-url", help="use this database (default: DATABASE_URL)")
    parser.add_argument("--no-reload", action="store_true", help="do not restart on code changes")
    parser.add_argument(
        "--log-level", default="warning", help="uvicorn's log level (warning; info shows requests)"
    )
    parser.set_defaults(handler=run)


@dataclass(frozen=True)
class DevSecrets:
    signing_key: str
    dashboard_password: str


def load_secrets(state_dir: Path) -> DevSecrets:
    """The development secrets of this project, made on first use (file mode 0600)."""
    path = state_dir / "dev.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            return DevSecrets(str(data["signing_key"]), str(data["dashboard_password"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"{path} is not a flowkeeper dev secrets file ({exc}); delete it to make new ones."
            ) from None
    state_dir.mkdir(parents=True, exist_ok=True)
    ignore = state_dir / ".gitignore"
    if not ignore.exists():
        # The folder holds a database and secrets: never commit it.
        ignore.write_text("*\n")
    made = DevSecrets(secrets.token_urlsafe(32), secrets.token_urlsafe(12))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(
            {"signing_key": made.signing_key, "dashboard_password": made.dashboard_password}, fh
        )
    return made


class _Stop(BaseException):
    """SIGTERM arrived: unwind through every ``finally`` (not an ``Exception``)."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class SchedulerThread:
    """The scheduler loop on an event loop of its own, beside uvicorn's supervisor."""

    def __init__(self, database_url: str, signing_key: str, endpoint: str, host: str, port: int):
        self.args = (database_url, signing_key, endpoint)
        self.host, self.port = host, port
        self.loop: asyncio.AbstractEventLoop | None = None
        self.scheduler: Any = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._main, name="flowkeeper-dev-scheduler")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        loop, scheduler = self.loop, self.scheduler
        if loop is not None and scheduler is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(scheduler.stop)
        self.thread.join(timeout=15)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        from ..client import FlowKeeper
        from ..scheduler import SchedulerLoop

        # Dispatching before uvicorn listens would only log refused connections.
        while not self.stopping.is_set():
            with contextlib.suppress(OSError):
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                break
            await asyncio.sleep(0.1)
        if self.stopping.is_set():
            return
        url, key, endpoint = self.args
        fk = FlowKeeper(url, signing_key=key, endpoint=endpoint)
        try:
            self.scheduler = SchedulerLoop(fk)
            self.loop = asyncio.get_running_loop()
            if self.stopping.is_set():
                return
            await self.scheduler.run()
        finally:
            await fk.aclose()


async def _migrate(url: str, key: str) -> None:
    from ..client import FlowKeeper

    fk = FlowKeeper(url, signing_key=key)
    try:
        await fk.migrate()
    finally:
        await fk.aclose()


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..testing.postgres import PostgresCluster

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    cwd = Path.cwd()
    state_dir = (cwd / args.state_dir).resolve()
    mount = "/" + args.mount.strip("/")
    if not _port_free(args.host, args.port):
        raise ConfigurationError(
            f"Port {args.port} on {args.host} is in use: stop what listens there or pass "
            "--port with another one."
        )
    dev = load_secrets(state_dir)
    cluster: PostgresCluster | None = None
    scheduler: SchedulerThread | None = None
    url = (
        args.database_url
        or os.environ.get("FLOWKEEPER_DATABASE_URL")
        or os.environ.get("DATABASE_URL")
    )
    try:
        if url:
            where = f"DATABASE_URL ({url.split('@')[-1]})"
        else:
            print(f"flowkeeper dev: starting PostgreSQL in {_rel(state_dir / 'pg', cwd)} ...")
            cluster = PostgresCluster(state_dir / "pg")
            url = cluster.start()
            where = f"embedded PostgreSQL {url.split('@')[-1]} (data in {_rel(state_dir, cwd)}/pg)"
        key = os.environ.get("FLOWKEEPER_SIGNING_KEY") or dev.signing_key
        password = os.environ.get("FLOWKEEPER_DASHBOARD_PASSWORD") or dev.dashboard_password
        shown_host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
        endpoint = os.environ.get("FLOWKEEPER_ENDPOINT") or (
            f"http://{shown_host}:{args.port}{mount}"
        )
        asyncio.run(_migrate(url, key.split(",")[0]))
        # The app (and uvicorn's reloaded worker processes) read these.
        os.environ["DATABASE_URL"] = url
        os.environ.pop("FLOWKEEPER_DATABASE_URL", None)
        os.environ["FLOWKEEPER_SIGNING_KEY"] = key
        os.environ["FLOWKEEPER_ENDPOINT"] = endpoint
        os.environ["FLOWKEEPER_DASHBOARD_PASSWORD"] = password
        print(f"  database   {where}")
        print(f"  app        {args.app} on http://{shown_host}:{args.port}", end="")
        print("" if args.no_reload else " (reloads when a .py file changes)")
        print(f"  endpoint   {endpoint}  (scheduler loop running in this process)")
        print(f"  dashboard  {endpoint}/ui   password: {password}")
        print(f"  secrets    {_rel(state_dir / 'dev.json', cwd)}  (Ctrl-C or SIGTERM stops all)")
        sys.stdout.flush()
        scheduler = SchedulerThread(url, key, endpoint, args.host, args.port)
        scheduler.start()
        if str(cwd) not in sys.path:
            sys.path.insert(0, str(cwd))  # spawned reload workers import the app from here
        uvicorn.run(
            args.app,
            host=args.host,
            port=args.port,
            reload=not args.no_reload,
            reload_dirs=[str(cwd)],
            reload_excludes=[f"{args.state_dir}/*", ".venv/*", ".git/*"],
            log_level=args.log_level,
            lifespan="auto",
        )
    except _Stop:
        pass
    finally:
        # From here on a second SIGTERM must not cut the clean-up short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if scheduler is not None:
            scheduler.stop()
        if cluster is not None:
            cluster.stop()
            print("flowkeeper dev: PostgreSQL stopped", flush=True)
        signal.signal(signal.SIGTERM, previous)
    return 0


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)
