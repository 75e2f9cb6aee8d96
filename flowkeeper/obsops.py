"""The observability part of the FlowKeeper facade: step logs, driver health, tracing."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError
from .ids import check_run_id

if TYPE_CHECKING:
    import asyncpg

    from .engine import Engine
    from .health import Health
    from .metrics import Metrics
    from .steplogs import LogLine
    from .store import Store
    from .tracing import Tracing


class ObservabilityOperations:
    """Mixed into FlowKeeper (which provides ``store`` and ``engine``)."""

    store: Store
    engine: Engine

    def _setup_observability(
        self,
        *,
        step_logs: bool,
        step_log_level: int | str,
        step_log_bytes: int,
        run_log_bytes: int,
        capture_print: bool,
        tracing: object,
        metrics: object,
        metrics_token: str | None,
        allow_weak: bool,
        stall_threshold: float | None,
    ) -> None:
        from . import tracing as tracing_module

        if step_logs:
            from .steplogs import StepLogs

            for name, value in (
                ("step_log_bytes", step_log_bytes),
                ("run_log_bytes", run_log_bytes),
            ):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1024:
                    raise ConfigurationError(
                        f"{name} must be a whole number >= 1024, got {value!r}"
                    )
            try:
                logging._checkLevel(step_log_level)  # type: ignore[attr-defined]
            except (ValueError, TypeError):
                raise ConfigurationError(
                    f"step_log_level must be a logging level such as 'INFO', got {step_log_level!r}"
                ) from None
            self.engine.observers.add(
                StepLogs(
                    self.store,
                    level=step_log_level,
                    step_bytes=step_log_bytes,
                    run_bytes=run_log_bytes,
                    capture_print=capture_print,
                )
            )
        if stall_threshold is not None:
            import math

            from .stalls import StallWatch

            if (
                not isinstance(stall_threshold, int | float)
                or isinstance(stall_threshold, bool)
                or not math.isfinite(stall_threshold)
                or stall_threshold <= 0
            ):
                raise ConfigurationError(
                    f"stall_threshold must be a positive number of seconds (or None to turn "
                    f"the check off), got {stall_threshold!r}"
                )
            self.engine.observers.add(StallWatch(self.store, float(stall_threshold)))
        from . import metrics as metrics_module

        #: OpenTelemetry metrics (flowkeeper.metrics): None when OpenTelemetry is not in use.
        self.metrics: Metrics | None = metrics_module.setup(
            self.engine, self.store, enabled=metrics
        )
        token = metrics_token or os.environ.get("FLOWKEEPER_METRICS_TOKEN") or None
        if token is not None and not allow_weak and len(token.strip()) < 16:
            raise ConfigurationError(
                "metrics_token must be at least 16 characters: it guards GET <endpoint>/metrics "
                '(python -c "import secrets; print(secrets.token_urlsafe(24))").'
            )
        #: The bearer token of the Prometheus endpoint (None: the endpoint is off).
        self.metrics_token = token
        #: Tracing (flowkeeper.tracing): None when OpenTelemetry is not in use.
        self.tracer: Tracing | None = tracing_module.setup(self.engine, self.store, enabled=tracing)

    async def run_logs(self, run_id: str, *, limit: int = 5000) -> list[LogLine]:
        """The log lines run ``run_id``'s code emitted, oldest first (see flowkeeper.steplogs)."""
        from . import steplogs

        return await steplogs.read(self.store, check_run_id(run_id), limit=limit)

    async def health(self, **options: Any) -> Health:
        """Drivers seen and the due/overdue backlog (see flowkeeper.health)."""
        from . import health

        return await health.check(self.store, **options)

    # tracing ------------------------------------------------------------------------------
    tracer: Tracing | None

    def _trace_carrier(self) -> dict[str, str] | None:
        if self.tracer is None:
            return None
        from .tracing import carrier

        return carrier()

    async def _keep_trace(
        self, run_id: str, trace: dict[str, str], connection: asyncpg.Connection | None
    ) -> None:
        """Store the run's trace context (in the caller's transaction, with ``connection``)."""
        import json

        await self.store.run_trace_put(run_id, json.dumps(trace), conn=connection)

    async def flush_telemetry(self) -> None:
        """Export finished spans and metrics now (the Lambda and Vercel adapters call it)."""
        if self.tracer is not None:
            try:
                await self.tracer.flush()
            except Exception as exc:  # an exporter's failure is not the caller's
                logging.getLogger("flowkeeper").warning("flushing spans failed: %s", exc)
        if self.metrics is not None:
            try:
                await self.metrics.flush()
            except Exception as exc:
                logging.getLogger("flowkeeper").warning("flushing metrics failed: %s", exc)

    async def prometheus_metrics(self) -> str:
        """The database-derived gauges as Prometheus text (GET <endpoint>/metrics)."""
        from . import health, metrics

        state = await health.check(self.store)
        return metrics.prometheus_text(await self.store.runs_by_status(), state)
