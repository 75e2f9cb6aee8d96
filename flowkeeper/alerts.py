"""Failure alerts: a webhook POST and/or the workflow's ``on_failure`` hook.

When a run fails for good, a trigger in the database writes an outbox row
(``alerts``) in the same transaction as the status change, whatever code
path failed the run.  The invocation that failed it delivers the alert right
after its commit; anything that could not be delivered then (the receiver was
down, the process died) is retried with backoff by every scheduler tick.  The
run's own state change never waits for, or depends on, an alert.

Each destination is recorded once it has accepted the alert, so a retry never
sends it twice to a destination that already took it.  The ``on_failure``
hook runs only in a process where the workflow is registered (the endpoint,
the ``/tick`` route, ``flowkeeper tick --app module:fk``); elsewhere the
webhook is delivered and the hook is left to such a process.

The webhook body is JSON with a Slack-compatible ``text`` and the details in
fields of their own (see :meth:`FailureAlert.as_json`); it is signed like an
invocation (``Flowkeeper-Signature``, over the webhook URL's path) so a
receiver may verify that it came from this deployment.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import ConfigurationError
from .signing import RequestSigner
from .store import Store
from .workflow import Registry

if TYPE_CHECKING:
    import asyncpg

logger = logging.getLogger("flowkeeper")

__all__ = ["AlertSender", "FailureAlert", "alert_backoff", "validate_webhook"]

_LEASE = timedelta(seconds=60)


def validate_webhook(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ConfigurationError(
            f"Invalid alert webhook URL {url!r}: give the full http(s) URL to POST failure "
            "alerts to, e.g. a Slack incoming webhook (FLOWKEEPER_ALERT_WEBHOOK)."
        )
    return url


def alert_backoff(attempt: int, *, base: float = 10.0, cap: float = 3600.0) -> timedelta:
    """Wait after failed delivery attempt ``attempt``: 10 s, 20 s, 40 s... up to an hour."""
    seconds = min(cap, base * 2.0 ** max(0, attempt - 1))
    return timedelta(seconds=seconds * random.uniform(0.8, 1.2))


@dataclass(frozen=True, slots=True)
class FailureAlert:
    """What an ``on_failure`` hook receives, and what the webhook body carries."""

    run_id: str
    workflow: str
    error_type: str
    message: str
    step: str | None
    traceback: str | None
    input: Any
    idempotency_key: str | None
    started_at: datetime | None
    failed_at: datetime | None
    #: The run's page on the dashboard, when the endpoint URL and a dashboard are configured.
    url: str | None
    #: Delivery attempt of this alert (1 for the first).
    attempt: int

    @property
    def text(self) -> str:
        """A one-message summary in Slack's mrkdwn (with its escaping)."""
        where = f" at step `{_slack(self.step)}`" if self.step else ""
        text = (
            f":rotating_light: flowkeeper: run of *{_slack(self.workflow)}* failed{where}: "
            f"{_slack(self.error_type)}: {_slack(_clip(self.message, 500))}"
        )
        if self.url:
            text += f"\n<{self.url}|Open run {self.run_id}>"
        else:
            text += f"\nrun {self.run_id}"
        return text

    def as_json(self) -> dict[str, Any]:
        """The webhook body."""
        return {
            "text": self.text,
            "event": "run.failed",
            "run_id": self.run_id,
            "workflow": self.workflow,
            "status": "failed",
            "error": {
                "type": self.error_type,
                "message": self.message,
                "step": self.step,
            },
            "idempotency_key": self.idempotency_key,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "failed_at": self.failed_at.isoformat() if self.failed_at else None,
            "url": self.url,
            "attempt": self.attempt,
        }


def _slack(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class AlertSender:
    """Delivers the failure alerts of the outbox; one per FlowKeeper."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        signer: RequestSigner,
        *,
        webhook: str | None,
        run_url: str | None,
        timeout: float = 5.0,
        hook_timeout: float = 30.0,
        max_attempts: int = 12,
    ) -> None:
        self.store = store
        self.registry = registry
        self.signer = signer
        self.webhook = validate_webhook(webhook) if webhook else None
        #: A format string with {run_id}, for the link in the alert.
        self.run_url = run_url
        self.timeout = timeout
        self.hook_timeout = hook_timeout
        self.max_attempts = max_attempts

    async def after_failure(self, run_id: str) -> None:
        """Deliver the alert of a run this process just failed; never raises."""
        try:
            for row in await self.store.claim_alerts(5, _LEASE, run_id):
                await self._deliver(row)
        except Exception as exc:  # the tick retries; the run's state is already written
            logger.warning("run %s: failure alert not delivered yet (%s)", run_id, exc)

    async def deliver_due(self, *, limit: int = 100) -> int:
        """Deliver (or retry) every due alert, up to ``limit``; return how many were tried.

        Called by every scheduler tick.  Never raises: a database or receiver
        problem leaves the alerts due for the next tick.
        """
        try:
            rows = await self.store.claim_alerts(limit, _LEASE)
        except Exception as exc:  # never the tick's failure: the alerts stay due
            logger.warning("failure alerts: could not claim due alerts (%s)", exc)
            return 0
        for row in rows:
            try:
                await self._deliver(row)
            except Exception as exc:  # keep going with the others; this one's lease expires
                logger.warning("failure alert %s of run %s: %s", row["id"], row["run_id"], exc)
        return len(rows)

    # one alert -----------------------------------------------------------------
    def alert_for(self, row: asyncpg.Record) -> FailureAlert:
        error = json.loads(row["error"]) if row["error"] else {}
        run_id = str(row["run_id"])
        return FailureAlert(
            run_id=run_id,
            workflow=row["workflow"],
            error_type=str(error.get("type") or "Error"),
            message=str(error.get("message") or ""),
            step=error.get("step"),
            traceback=error.get("traceback"),
            input=json.loads(row["input"]) if row["input"] else None,
            idempotency_key=row["idempotency_key"],
            started_at=row["started_at"],
            failed_at=row["finished_at"],
            url=self.run_url.format(run_id=run_id) if self.run_url else None,
            attempt=row["attempts"],
        )

    async def _deliver(self, row: asyncpg.Record) -> None:
        alert = self.alert_for(row)
        done = list(row["done"])
        errors: dict[str, str] = {}

        if self.webhook and "webhook" not in done:
            problem = await self._post(alert)
            if problem is None:
                done.append("webhook")
            else:
                errors["webhook"] = problem

        hook_settled = self._hook_settled(alert, done)
        if not hook_settled and alert.workflow in self.registry:
            problem = await self._call_hook(alert)
            if problem is None:
                done.append("hook")
                hook_settled = True
            else:
                errors["hook"] = problem

        attempt = alert.attempt
        webhook_settled = self.webhook is None or "webhook" in done
        if webhook_settled and hook_settled:
            detail = {"destinations": done, "attempt": attempt}
            await self.store.alert_result(
                row["id"],
                done=done,
                outcome="delivered",
                retry_in=None,
                error=None,
                event="alert_sent" if done else None,
                detail=detail,
            )
            if done:
                logger.info("run %s: failure alert sent to %s", alert.run_id, ", ".join(done))
            return
        if not errors:
            # Nothing failed: the hook waits for a process that registers the workflow.
            errors["hook"] = (
                f"workflow {alert.workflow!r} is not registered in the process that delivered "
                "the webhook; its on_failure hook (if it has one) waits for one that is"
            )
        message = "; ".join(f"{k}: {v}" for k, v in errors.items())
        if attempt >= self.max_attempts:
            logger.error(
                "run %s: failure alert abandoned after %d attempts: %s",
                alert.run_id,
                attempt,
                message,
            )
            await self.store.alert_result(
                row["id"],
                done=done,
                outcome="abandoned",
                retry_in=None,
                error=message,
                event="alert_abandoned",
                detail={"attempt": attempt, "errors": errors, "destinations": done},
            )
            return
        delay = alert_backoff(attempt)
        logger.warning(
            "run %s: failure alert attempt %d failed (%s); retrying in %.0fs",
            alert.run_id,
            attempt,
            message,
            delay.total_seconds(),
        )
        await self.store.alert_result(
            row["id"],
            done=done,
            outcome=None,
            retry_in=delay,
            error=message,
            event="alert_failed",
            detail={
                "attempt": attempt,
                "errors": errors,
                "destinations": done,
                "retry_in": round(delay.total_seconds(), 1),
            },
        )

    def _hook_settled(self, alert: FailureAlert, done: list[str]) -> bool:
        if "hook" in done:
            return True
        if alert.workflow in self.registry:
            return self.registry.get(alert.workflow).on_failure is None
        # No process can hold a hook for a workflow that no process registers.
        return alert.error_type.endswith("UnknownWorkflowError")

    async def _post(self, alert: FailureAlert) -> str | None:
        import httpx

        assert self.webhook is not None
        body = json.dumps(alert.as_json(), separators=(",", ":")).encode()
        path = urlsplit(self.webhook).path or "/"
        headers = self.signer.sign(method="POST", path=path, body=body)
        headers["Content-Type"] = "application/json"
        headers["User-Agent"] = "flowkeeper-alerts"
        try:
            async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client:
                response = await client.post(self.webhook, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc or 'no detail'}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}: {_clip(response.text.strip(), 200)}"

    async def _call_hook(self, alert: FailureAlert) -> str | None:
        hook = self.registry.get(alert.workflow).on_failure
        assert hook is not None
        try:
            async with asyncio.timeout(self.hook_timeout):
                if inspect.iscoroutinefunction(hook):
                    await hook(alert)
                else:
                    result = await asyncio.to_thread(hook, alert)
                    if inspect.isawaitable(result):
                        await result
        except Exception as exc:
            logger.warning(
                "run %s: on_failure hook of %s raised %s: %s",
                alert.run_id,
                alert.workflow,
                type(exc).__name__,
                exc,
            )
            return f"{type(exc).__name__}: {exc}"
        return None
