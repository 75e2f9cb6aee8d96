"""Mounting the endpoint at /api/flowkeeper in a FastAPI or Starlette app, served by uvicorn."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount

from flowkeeper import Context, FlowKeeper

from ..helpers import KEY, Served, make_fk


def fastapi_app(fk: FlowKeeper) -> Any:
    app = FastAPI()

    @app.post("/orders/{order_id}")
    async def place(order_id: str) -> dict[str, str]:
        handle = await fk.trigger("greet", order_id, idempotency_key=order_id)
        return {"run_id": handle.run_id}

    app.mount("/api/flowkeeper", fk.asgi())
    return app


def starlette_app(fk: FlowKeeper) -> Any:
    return Starlette(routes=[Mount("/api/flowkeeper", app=fk.asgi())])


@pytest.mark.parametrize("framework", ["fastapi", "starlette"])
async def test_mounted_endpoint_runs_workflows(database_url: str, framework: str) -> None:
    fk = make_fk(database_url, cron_secret="cron-secret")

    async def greet(name: str) -> str:
        return f"hello {name}"

    @fk.workflow("greet")
    async def workflow(ctx: Context, name: str) -> str:
        return await ctx.step("greet", greet, name)

    app = fastapi_app(fk) if framework == "fastapi" else starlette_app(fk)
    try:
        async with Served(app, fk.test_port) as server:  # type: ignore[attr-defined]
            async with httpx.AsyncClient(base_url=server.base_url) as http:
                health = await http.get("/api/flowkeeper/")
                assert health.json()["service"] == "flowkeeper"
                unsigned = await http.post("/api/flowkeeper/", json={"run_id": "x"})
                assert unsigned.status_code == 401
                tick = await http.get(
                    "/api/flowkeeper/tick", headers={"authorization": "Bearer cron-secret"}
                )
                assert tick.status_code == 200
                if framework == "fastapi":
                    run_id = (await http.post("/orders/o-1")).json()["run_id"]
                else:
                    run_id = (await fk.trigger("greet", "o-1")).run_id
            # The trigger pushed a signed invocation to the mounted endpoint.
            assert await fk.result(run_id, timeout=10) == "hello o-1"
        assert (await fk.get_run(run_id)).invocations == 1
    finally:
        await fk.aclose()


def test_import_and_building_apps_do_no_network_io() -> None:
    """Cold start: importing flowkeeper and both adapters and building every app opens
    no socket (the database is never contacted before the first request)."""
    script = textwrap.dedent(
        f"""
        import socket
        opened = []
        real_connect = socket.socket.connect
        def connect(self, address):
            opened.append(address)
            return real_connect(self, address)
        socket.socket.connect = connect
        socket.create_connection = lambda *a, **k: opened.append(a) or 1 / 0

        from flowkeeper import FlowKeeper
        import flowkeeper_aws_lambda, flowkeeper_vercel
        fk = FlowKeeper("postgresql://u:p@db.invalid:5432/app", signing_key={KEY!r},
                        endpoint="https://shop.example/api/flowkeeper", cron_secret="s")
        fk.asgi()
        flowkeeper_vercel.app(fk)
        flowkeeper_aws_lambda.handler(fk)
        assert opened == [], opened
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_socket_patch_in_cold_start_check_works() -> None:
    """The check above would see a connection: prove the patch catches one."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    script = textwrap.dedent(
        f"""
        import socket
        opened = []
        real_connect = socket.socket.connect
        def connect(self, address):
            opened.append(address)
            return real_connect(self, address)
        socket.socket.connect = connect
        import asyncio, asyncpg
        async def main():
            try:
                await asyncpg.connect("postgresql://u@127.0.0.1:{port}/db", timeout=0.5)
            except Exception:
                pass
        asyncio.run(main())
        print(len(opened))
        """
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
    finally:
        server.close()
    assert proc.stdout.strip() != "0", proc.stderr
