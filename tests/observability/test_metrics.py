"""Metrics: OTel instruments after a known workload, and the Prometheus endpoint parsed."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

from flowkeeper import ConfigurationError, Context, FlowKeeper, NonRetriableError, RetryPolicy
from flowkeeper.testing.postgres import free_port

from ..helpers import drive, make_fk, serve

TOKEN = "metrics-token-0123456789"


def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    data = reader.get_metrics_data()
    out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    out.setdefault(metric.name, []).append((dict(p.attributes or {}), p))
    return out


def value(pts: dict[str, list[tuple[dict[str, Any], Any]]], name: str, **labels: Any) -> Any:
    found = [p for attrs, p in pts.get(name, []) if attrs == labels]
    assert len(found) == 1, (name, labels, pts.get(name))
    return found[0]


def workload(fk: FlowKeeper) -> None:
    tries: dict[int, int] = {}

    def charge(n: int) -> int:
        tries[n] = tries.get(n, 0) + 1
        if tries[n] == 1:
            raise ConnectionError("declined, try again")
        return n

    @fk.workflow("shop", retry=RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0))
    async def shop(ctx: Context, n: int) -> int:
        await ctx.step("charge", charge, n)
        for _ in range(2):  # a loop: occurrence numbers do not make new series
            await ctx.step("pack", lambda: 1)
        return n

    def doom() -> None:
        raise NonRetriableError("no such product")

    @fk.workflow("doomed")
    async def doomed(ctx: Context) -> None:
        await ctx.step("check", doom)


async def test_metric_values_after_a_known_workload(database_url: str) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    fk = make_fk(database_url, metrics=provider)
    workload(fk)
    try:
        async with serve(fk):
            ids = [(await fk.trigger("shop", n)).run_id for n in (1, 2)]
            ids.append((await fk.trigger("doomed")).run_id)
            statuses = await drive(fk, ids)
        # A driver whose endpoint is down: its dispatch failures are counted.
        down = make_fk(database_url, metrics=provider, port=free_port())
        workload(down)
        conn = await asyncpg.connect(database_url)
        try:
            stuck = (await down.trigger("doomed")).run_id  # no endpoint answers: due
            await down.tick()
        finally:
            await conn.close()
            await down.aclose()
    finally:
        await fk.aclose()
    assert sorted(statuses.values()) == ["completed", "completed", "failed"]
    pts = points(reader)
    assert value(pts, "flowkeeper.runs.started", workflow="shop").value == 2
    assert value(pts, "flowkeeper.runs.started", workflow="doomed").value == 1
    assert value(pts, "flowkeeper.runs.completed", workflow="shop").value == 2
    assert value(pts, "flowkeeper.runs.failed", workflow="doomed").value == 1
    attempts = "flowkeeper.step.attempts"
    assert value(pts, attempts, workflow="shop", step="charge", outcome="error").value == 2
    assert value(pts, attempts, workflow="shop", step="charge", outcome="completed").value == 2
    assert value(pts, attempts, workflow="shop", step="pack", outcome="completed").value == 4
    assert value(pts, attempts, workflow="doomed", step="check", outcome="error").value == 1
    assert value(pts, "flowkeeper.step.failures", workflow="shop", step="charge").value == 2
    duration = value(pts, "flowkeeper.step.duration", workflow="shop", step="charge")
    assert duration.count == 4 and duration.sum >= 0
    per_run = value(pts, "flowkeeper.run.invocations", workflow="shop")
    assert per_run.count == 2 and per_run.sum >= 4  # each retried in a second invocation
    retrying = value(pts, "flowkeeper.invocations", workflow="shop", outcome="retrying").value
    assert retrying == 2
    assert value(pts, "flowkeeper.dispatch.failures", driver="python").value >= 1
    depth = value(pts, "flowkeeper.queue.depth")
    assert depth.value >= 0
    assert stuck


def test_a_short_metrics_token_is_refused(database_url: str) -> None:
    with pytest.raises(ConfigurationError, match="metrics_token must be at least 16"):
        make_fk(database_url, metrics_token="short")


async def test_prometheus_endpoint_is_off_guarded_and_parses(database_url: str) -> None:
    off = make_fk(database_url)
    try:
        async with serve(off), httpx.AsyncClient() as client:
            answer = await client.get(off.dispatcher.endpoint + "/metrics")  # type: ignore[union-attr]
            assert answer.status_code == 404
            assert answer.json()["error"]["code"] == "metrics_off"
    finally:
        await off.aclose()

    fk = make_fk(database_url, metrics_token=TOKEN)
    workload(fk)
    try:
        async with serve(fk), httpx.AsyncClient() as client:
            ids = [(await fk.trigger("shop", n)).run_id for n in (1, 2)]
            ids.append((await fk.trigger("doomed")).run_id)
            await drive(fk, ids)
            conn = await asyncpg.connect(database_url)
            try:  # a hostile driver place, and one overdue run
                await conn.execute(
                    "INSERT INTO flowkeeper.driver_ticks (kind, place) VALUES ('cli', $1)",
                    'host "a"\\b\nline2',
                )
                await conn.execute(
                    "INSERT INTO flowkeeper.runs (id, workflow, status, due_at) "
                    "VALUES (gen_random_uuid(), 'shop', 'queued', now() - interval '1 hour')"
                )
            finally:
                await conn.close()
            url = fk.dispatcher.endpoint + "/metrics"  # type: ignore[union-attr]
            assert (await client.get(url)).status_code == 401
            wrong = await client.get(url, headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
            answer = await client.get(url, headers={"authorization": f"Bearer {TOKEN}"})
    finally:
        await fk.aclose()
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    runs = {s.labels["status"]: s.value for s in families["flowkeeper_runs"].samples}
    assert runs["completed"] == 2 and runs["failed"] == 1 and runs["queued"] == 1
    assert runs["cancelled"] == 0
    assert families["flowkeeper_overdue_runs"].samples[0].value == 1
    assert families["flowkeeper_due_runs"].samples[0].value == 1
    assert families["flowkeeper_oldest_due_seconds"].samples[0].value >= 3500
    places = {s.labels["place"] for s in families["flowkeeper_driver_last_tick_seconds"].samples}
    assert 'host "a"\\b\nline2' in places
    assert families["flowkeeper_healthy"].samples[0].value == 0
