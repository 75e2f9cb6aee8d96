"""examples/django: Django's test client, a real WSGI server, a real PostgreSQL.

The trigger shares the order's ``transaction.atomic()``; the commit pushes the
run (``on_commit``) to the endpoint, served as a Django view by a real server;
a rolled-back order leaves no run. The dashboard answers through the same view.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from flowkeeper.testing.postgres import free_port

from ..helpers import KEY
from .conftest import load_example, wsgi_server


def test_django_shop_end_to_end(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("FLOWKEEPER_SIGNING_KEY", KEY)
    monkeypatch.setenv("FLOWKEEPER_ENDPOINT", f"http://127.0.0.1:{port}/api/flowkeeper")
    monkeypatch.setenv("FLOWKEEPER_DASHBOARD_PASSWORD", "django-example-password")
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "djshop.settings")
    os.environ.pop("DJANGO_DEBUG", None)
    load_example("django", "djshop.settings")
    import django
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client

    django.setup()
    call_command("migrate", verbosity=0)
    import importlib

    wsgi = importlib.import_module("djshop.wsgi")
    workflows = importlib.import_module("djshop.workflows")
    client = Client(raise_request_exception=False)
    try:
        with wsgi_server(wsgi.application, port):
            failed = client.post(
                "/orders", {"item": "lamp", "fail": True}, content_type="application/json"
            )
            assert failed.status_code == 500
            with connection.cursor() as cur:
                cur.execute("SELECT count(*) FROM djshop_order")
                assert cur.fetchone()[0] == 0
                cur.execute("SELECT count(*) FROM flowkeeper.runs")
                assert cur.fetchone()[0] == 0

            reply = client.post("/orders", {"item": "lamp"}, content_type="application/json")
            assert reply.status_code == 201, reply.content
            run_id = reply.json()["run_id"]
            deadline = time.monotonic() + 20
            body: dict[str, Any] = {}
            while time.monotonic() < deadline:
                body = client.get(f"/runs/{run_id}").json()
                if body["status"] == "completed":
                    break
                time.sleep(0.05)
            # Pushed on commit, without any scheduler running.
            assert body == {"status": "completed", "output": "lamp shipped"}

            # The endpoint answers Django's own test client too (the dashboard's sign-in).
            page = client.get("/api/flowkeeper/ui/login")
            assert page.status_code == 200 and b"password" in page.content.lower()
            unsigned = client.post("/api/flowkeeper/", b"{}", content_type="application/json")
            assert unsigned.status_code in (400, 401, 403)
    finally:
        workflows.fk.sync.close()
        connection.close()
