"""A shop on AWS Lambda: the checkout workflow from flowkeeper's DESIGN.md, durable.

One Lambda function serves everything, through its function URL:

``POST /api/orders``            place an order: triggers the checkout workflow
``GET  /api/orders/{run_id}``   the run: status, steps, output
``/api/flowkeeper/...``         the flowkeeper endpoint

An EventBridge schedule invokes the function every minute with
``{"flowkeeper": {"action": "tick"}}``, which resumes sleeps and retries.
Runs are pushed by invoking the function itself (no URL needed).

Environment: DATABASE_URL, FLOWKEEPER_SIGNING_KEY (template.yaml sets both).
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta

import flowkeeper_aws_lambda
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from flowkeeper import Context, FlowKeeper, RetryPolicy, RunNotFoundError

# A day in production; set CHECKOUT_REVIEW_DELAY (seconds) to watch it happen.
REVIEW_DELAY = timedelta(seconds=float(os.environ.get("CHECKOUT_REVIEW_DELAY", "86400")))

fk = FlowKeeper()


class Order(BaseModel):
    id: str
    email: str
    amount_cents: int
    flaky_card: bool = False  # the card network fails the first attempt in each instance


class Charge(BaseModel):
    id: str
    amount_cents: int


class CardNetworkError(Exception):
    """Transient: the step is retried with backoff."""


_charge_attempts: dict[str, int] = {}


async def stripe_charge(order: Order) -> Charge:
    # Stand-in for the Stripe call (pass order.id as Stripe's idempotency key).
    _charge_attempts[order.id] = _charge_attempts.get(order.id, 0) + 1
    await asyncio.sleep(0.05)
    if order.flaky_card and _charge_attempts[order.id] == 1:
        raise CardNetworkError("card network timed out")
    return Charge(id=f"ch_{order.id}", amount_cents=order.amount_cents)


def send_receipt(order: Order, charge: Charge) -> str:
    # Stand-in for the email provider; a sync function runs in a thread.
    return f"receipt for {charge.id} sent to {order.email}"


async def send_review_request(order: Order) -> str:
    return f"review request sent to {order.email}"


@fk.workflow("checkout", retry=RetryPolicy(max_attempts=5, initial_delay=1, max_delay=60))
async def checkout(ctx: Context, order: Order) -> dict[str, str]:
    charge = await ctx.step("charge-card", stripe_charge, order)
    receipt = await ctx.step("send-receipt", send_receipt, order, charge)
    await ctx.sleep("wait-for-review", REVIEW_DELAY)
    review = await ctx.step("ask-for-review", send_review_request, order)
    return {"charge": charge.id, "receipt": receipt, "review": review}


async def place_order(request: Request) -> JSONResponse:
    try:
        order = Order.model_validate_json(await request.body())
    except ValidationError as exc:
        return JSONResponse({"error": exc.errors(include_url=False)}, status_code=422)
    handle = await fk.trigger("checkout", order, idempotency_key=order.id)
    return JSONResponse({"run_id": handle.run_id, "created": handle.created}, status_code=201)


async def show_order(request: Request) -> JSONResponse:
    try:
        info = await fk.get_run(request.path_params["run_id"])
    except RunNotFoundError as exc:
        return JSONResponse({"error": str(exc)}, status_code=404)
    return JSONResponse(
        {
            "status": info.status.value,
            "output": info.output,
            "error": info.error,
            "steps": [
                {"key": s.key, "status": s.status, "attempts": s.attempts} for s in info.steps
            ],
        }
    )


shop = Starlette(
    routes=[
        Route("/api/orders", place_order, methods=["POST"]),
        Route("/api/orders/{run_id}", show_order, methods=["GET"]),
        Mount("/api/flowkeeper", app=fk.asgi()),
    ]
)

# The function's handler (template.yaml: Handler: app.handler).
handler = flowkeeper_aws_lambda.handler(fk, shop)
