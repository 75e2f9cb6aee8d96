"""The checkout workflow from DESIGN.md, with stand-ins for Stripe and email.

``charge-card`` fails on its first attempt for some orders (a flaky card
network) and recovers on the retry; ``wait-for-review`` is a durable sleep
(a day in production, a few seconds in the demo).
"""

from __future__ import annotations

import asyncio
import os
import random
from datetime import timedelta

from pydantic import BaseModel

from flowkeeper import Context, RetryPolicy, define_workflow

REVIEW_DELAY = timedelta(seconds=float(os.environ.get("CHECKOUT_REVIEW_DELAY", str(24 * 3600))))


class Order(BaseModel):
    id: str
    email: str
    amount_cents: int
    flaky_card: bool = False


class Charge(BaseModel):
    id: str
    amount_cents: int


class CardNetworkError(Exception):
    """A transient failure: the step is retried with backoff."""


_attempts: dict[str, int] = {}


async def stripe_charge(order: Order) -> Charge:
    _attempts[order.id] = _attempts.get(order.id, 0) + 1
    await asyncio.sleep(random.uniform(0.02, 0.08))  # the network
    if order.flaky_card and _attempts[order.id] == 1:
        raise CardNetworkError("card network timed out")
    return Charge(id=f"ch_{order.id}", amount_cents=order.amount_cents)


def send_receipt(order: Order, charge: Charge) -> dict[str, str]:
    # A sync step: flowkeeper runs it in a thread.
    return {"to": order.email, "charge": charge.id}


async def send_review_request(order: Order) -> str:
    await asyncio.sleep(0.01)
    return f"review request sent to {order.email}"


async def checkout(ctx: Context, order: Order) -> dict[str, str]:
    charge = await ctx.step("charge-card", stripe_charge, order)
    receipt = await ctx.step("send-receipt", send_receipt, order, charge)
    await ctx.sleep("wait-for-review", REVIEW_DELAY)
    review = await ctx.step("ask-for-review", send_review_request, order)
    return {"charge": charge.id, "receipt_to": receipt["to"], "review": review}


checkout_workflow = define_workflow(
    "checkout", checkout, retry=RetryPolicy(max_attempts=5, initial_delay=0.5, max_delay=30)
)
