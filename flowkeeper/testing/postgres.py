"""A private PostgreSQL cluster from the system's binaries, for tests and demos.

``PostgresCluster`` runs ``initdb`` and ``pg_ctl`` on a data directory of its
own, listening on 127.0.0.1 at a free port with trust authentication — a
throw-away server that needs no set-up by hand.  PostgreSQL refuses to run as
root, so when this process is root the server runs as the ``postgres`` system
user.  Where no server binaries exist, the ``pgserver`` wheel (PyPI) is used
if installed.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import FlowKeeperError

logger = logging.getLogger("flowkeeper.testing")

_FAST = {
    # A throw-away cluster: durability buys nothing, speed does.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


class PostgresNotFoundError(FlowKeeperError):
    """No PostgreSQL server binaries (and no pgserver wheel) on this machine."""


def find_bindir() -> Path | None:
    """The directory of initdb/pg_ctl/postgres, or None."""
    env = os.environ.get("FLOWKEEPER_PG_BINDIR")
    candidates: list[str] = [env] if env else []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(out.stdout.strip())
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
        reverse=True,
    )
    candidates += ["/usr/local/pgsql/bin", "/opt/homebrew/bin", "/usr/local/bin"]
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresCluster:
    """Start and stop a private PostgreSQL server.

    ``data_dir`` None means a temporary directory removed on ``stop()``; a
    given directory is kept and reused across starts.  ``settings`` go into
    postgresql.conf; ``durable=False`` (the default) turns fsync off.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        port: int | None = None,
        durable: bool = False,
        settings: Mapping[str, str] | None = None,
        preload: Sequence[str] = (),
    ) -> None:
        self._temp = data_dir is None
        self.base = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="flowkeeper-pg-"))
        self.data = self.base / "data"
        self.port = port
        self.durable = durable
        self.settings = dict(settings or {})
        self.preload = list(preload)
        self.bindir = find_bindir()
        self._pgserver: Any = None
        self._url: str | None = None
        self.as_postgres_user = os.geteuid() == 0

    # public --------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the cluster is not started")
        return self._url

    def dsn(self, database: str = "postgres") -> str:
        """A URL for another database of this cluster."""
        base = self.url.rsplit("/", 1)[0]
        return f"{base}/{database}"

    def start(self) -> str:
        """Start (initialising on first use) and return a postgresql:// URL."""
        if self.bindir is None:
            return self._start_pgserver()
        self._prepare_dirs()
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        self._write_config()
        if self._running():
            self._pg_ctl("stop", "-m", "fast")
        log = self.base / "postgres.log"
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(log))
        self._url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        return self._url

    def stop(self) -> None:
        if self._pgserver is not None:
            with contextlib.suppress(Exception):
                self._pgserver.cleanup()
            self._pgserver = None
        elif self.bindir is not None and self._running():
            self._pg_ctl("stop", "-m", "fast", "-w", "-t", "60")
        self._url = None
        if self._temp:
            shutil.rmtree(self.base, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash); ``restart()`` brings it back with recovery."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().splitlines()[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)

    def restart(self) -> None:
        """Start again after ``kill()`` or ``stop()``, on the same port."""
        log = self.base / "postgres.log"
        # A killed postmaster leaves children for a moment; pg_ctl waits for the lock.
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(log))
        self._url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with psql as the superuser; return its output."""
        assert self.bindir is not None
        out = self._run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                sql,
            ]
        )
        return out

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # internals ------------------------------------------------------------------
    def _run(self, cmd: list[str], *, check: bool = True) -> str:
        if self.as_postgres_user:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise FlowKeeperError(
                f"{Path(cmd[0]).name} failed ({proc.returncode}): "
                f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}".strip()
            )
        return proc.stdout

    def _pg_ctl(self, *args: str) -> str:
        assert self.bindir is not None
        return self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), *args])

    def _running(self) -> bool:
        assert self.bindir is not None
        if not (self.data / "postmaster.pid").exists():
            return False
        out = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"], check=False)
        return "server is running" in out

    def _prepare_dirs(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if self.as_postgres_user:
            try:
                pg = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresNotFoundError(
                    "Running as root, and PostgreSQL refuses to run as root, but there is no "
                    "'postgres' system user to run it as. Create one (useradd postgres) or run "
                    "as an ordinary user."
                ) from None
            os.chown(self.base, pg.pw_uid, pg.pw_gid)
            # Let the postgres user reach a data directory below root-owned folders.
            for parent in self.base.parents:
                if parent == Path("/"):
                    break
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)

    def _initdb(self) -> None:
        assert self.bindir is not None
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )

    def _write_config(self) -> None:
        port_file = self.base / "port"
        if self.port is None and port_file.exists() and not self._temp:
            self.port = int(port_file.read_text())
        if self.port is None:
            self.port = free_port()
        conf: dict[str, str] = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.base}'",
            "max_connections": "300",
            "shared_buffers": "'128MB'",
            "log_min_messages": "warning",
            "jit": "off",
        }
        if not self.durable:
            conf.update(_FAST)
        if self.preload:
            conf["shared_preload_libraries"] = "'" + ",".join(self.preload) + "'"
        conf.update(self.settings)
        text = "".join(f"{k} = {v}\n" for k, v in conf.items())
        target = self.data / "flowkeeper.conf"
        main = self.data / "postgresql.conf"
        self._write_as_owner(target, text)
        include = "include_if_exists = 'flowkeeper.conf'\n"
        if include not in main.read_text():
            self._write_as_owner(main, main.read_text() + include)
        if not self._temp:
            port_file.write_text(str(self.port))

    def _write_as_owner(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self.as_postgres_user:
            pg = pwd.getpwnam("postgres")
            os.chown(path, pg.pw_uid, pg.pw_gid)

    def _start_pgserver(self) -> str:
        try:
            import pgserver  # type: ignore[import-not-found]
        except ImportError:
            raise PostgresNotFoundError(
                "No PostgreSQL server binaries found (initdb, pg_ctl) and the pgserver wheel is "
                "not installed. Install PostgreSQL (e.g. apt-get install postgresql) or "
                "`pip install pgserver`, or set DATABASE_URL to a server you have."
            ) from None
        self.base.mkdir(parents=True, exist_ok=True)
        self._pgserver = pgserver.get_server(str(self.base / "pgserver"), cleanup_mode="stop")
        self._url = str(self._pgserver.get_uri())
        return self._url


@contextlib.contextmanager
def running_cluster(**kwargs: Any) -> Iterator[PostgresCluster]:
    """``with running_cluster() as pg: pg.url``"""
    cluster = PostgresCluster(**kwargs)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
