"""``flowkeeper dev`` end to end: embedded Postgres, reloading app, scheduler, SIGTERM.

A sample project in a temporary folder is served by the real command (a
subprocess, as a user starts it); a run that sleeps two seconds must complete
through the in-process scheduler; SIGTERM must leave no process behind: no
uvicorn worker, no PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from flowkeeper.testing.postgres import find_bindir, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_bindir() is None, reason="needs PostgreSQL server binaries"),
]

SAMPLE_APP = """
from datetime import timedelta

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from flowkeeper import Context, FlowKeeper

fk = FlowKeeper()


def greet(name: str) -> str:
    return f"hello {name}"


@fk.workflow("nap")
async def nap(ctx: Context, name: str) -> str:
    greeting = await ctx.step("greet", greet, name)
    await ctx.sleep("nap", timedelta(seconds=2))
    return greeting + ", rested"


async def trigger(request: Request) -> JSONResponse:
    handle = await fk.trigger("nap", "ada")
    return JSONResponse({"run_id": handle.run_id})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def show(request: Request) -> JSONResponse:
    info = await fk.get_run(request.path_params["run_id"])
    return JSONResponse({"status": info.status, "output": info.output})


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/trigger", trigger, methods=["POST"]),
        Route("/runs/{run_id}", show),
        Mount("/api/flowkeeper", app=fk.asgi()),
    ]
)
"""


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FLOWKEEPER_") and k not in ("DATABASE_URL",)
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_dev_serves_schedules_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "sample.py").write_text(textwrap.dedent(SAMPLE_APP))
    port = free_port()
    flowkeeper = Path(sys.executable).parent / "flowkeeper"
    log = (tmp_path / "dev.log").open("w+")
    proc = subprocess.Popen(
        [str(flowkeeper), "dev", "sample:app", "--port", str(port)],
        cwd=tmp_path,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    postmaster: int | None = None
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, Path(log.name).read_text()
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, Path(log.name).read_text()
            time.sleep(0.2)
        pid_file = tmp_path / ".flowkeeper" / "pg" / "data" / "postmaster.pid"
        postmaster = int(pid_file.read_text().splitlines()[0])
        assert _alive(postmaster)

        run_id = httpx.post(f"{base}/trigger").json()["run_id"]
        deadline = time.monotonic() + 30
        while True:
            body = httpx.get(f"{base}/runs/{run_id}").json()
            if body["status"] == "completed":
                break
            assert body["status"] not in ("failed", "cancelled"), body
            assert time.monotonic() < deadline, (body, Path(log.name).read_text())
            time.sleep(0.2)
        assert body["output"] == "hello ada, rested"

        output = Path(log.name).read_text()
        secrets = json.loads((tmp_path / ".flowkeeper" / "dev.json").read_text())
        assert f"password: {secrets['dashboard_password']}" in output
        dashboard = re.search(r"dashboard\s+(\S+)", output)
        assert dashboard is not None
        login = httpx.get(
            dashboard.group(1).replace("localhost", "127.0.0.1"), follow_redirects=True
        )
        assert login.status_code == 200 and "password" in login.text.lower(), login.text
        assert len(output.strip().splitlines()) <= 10, output  # a few lines, not a log

        tree = _descendants(proc.pid)
        assert tree, "uvicorn's reloading worker should be a child process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, Path(log.name).read_text()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in [*tree, postmaster]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in tree if _alive(p)], "child processes left running"
        assert not _alive(postmaster), "PostgreSQL left running"
        assert not pid_file.exists()
        assert "PostgreSQL stopped" in Path(log.name).read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if postmaster is not None and _alive(postmaster):
            os.kill(postmaster, signal.SIGQUIT)
        log.close()


def test_dev_secrets_are_made_once_and_remembered(tmp_path: Path) -> None:
    from flowkeeper.cli.dev import load_secrets

    first = load_secrets(tmp_path / ".flowkeeper")
    again = load_secrets(tmp_path / ".flowkeeper")
    assert first == again
    assert len(first.signing_key) >= 32 and len(first.dashboard_password) >= 12
    mode = (tmp_path / ".flowkeeper" / "dev.json").stat().st_mode & 0o777
    assert mode == 0o600
    assert (tmp_path / ".flowkeeper" / ".gitignore").read_text() == "*\n"


def test_dev_refuses_a_busy_port_with_a_hint(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [str(Path(sys.executable).parent / "flowkeeper"), "dev", "x:app", "--port", str(port)],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1
    assert f"Port {port}" in out.stderr and "--port" in out.stderr
    assert not (tmp_path / ".flowkeeper" / "pg").exists()


def test_demo_stops_its_postgres_on_sigterm(tmp_path: Path) -> None:
    """./scripts/demo --serve, then SIGTERM: the embedded PostgreSQL must not outlive it."""
    root = Path(__file__).resolve().parents[2]
    env = _env() | {"FLOWKEEPER_DEMO_DIR": str(tmp_path), "CHECKOUT_REVIEW_DELAY": "0.2"}
    log = (tmp_path / "demo.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, str(root / "examples" / "demo.py"), "--serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    pid_file = tmp_path / "pg" / "data" / "postmaster.pid"
    postmaster: int | None = None
    try:
        deadline = time.monotonic() + 120
        while "dashboard" not in Path(log.name).read_text():
            assert proc.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, Path(log.name).read_text()
            time.sleep(0.2)
        postmaster = int(pid_file.read_text().splitlines()[0])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, Path(log.name).read_text()
        deadline = time.monotonic() + 10
        while _alive(postmaster) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(postmaster), "the demo left PostgreSQL running"
        assert "PostgreSQL stopped" in Path(log.name).read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if postmaster is not None and _alive(postmaster):
            os.kill(postmaster, signal.SIGQUIT)
        log.close()
