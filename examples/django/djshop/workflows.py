"""The shop's workflow: fulfil an order once its row is committed."""

from __future__ import annotations

from flowkeeper import Context, FlowKeeper

fk = FlowKeeper()  # DATABASE_URL, FLOWKEEPER_SIGNING_KEY, FLOWKEEPER_ENDPOINT


def ship(order_id: int) -> str:
    from django.db import connection

    from .models import Order

    try:
        order = Order.objects.get(id=order_id)  # sync steps may use the ORM: they run in threads
    finally:
        # Django closes connections at the end of a request; a step thread is not
        # one, so it closes the connection it opened.
        connection.close()
    return f"{order.item} shipped"


@fk.workflow("fulfil")
async def fulfil(ctx: Context, order_id: int) -> str:
    return await ctx.step("ship", ship, order_id)
