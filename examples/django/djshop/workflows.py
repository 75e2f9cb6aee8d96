"""The shop's workflow: fulfil an order once its row is committed."""

from __future__ import annotations

from flowkeeper import Context, FlowKeeper

fk = FlowKeeper()  # DATABASE_URL, FLOWKEEPER_SIGNING_KEY, FLOWKEEPER_ENDPOINT


def ship(order_id: int) -> str:
    from .models import Order

    order = Order.objects.get(id=order_id)  # sync steps may use the ORM: they run in threads
    return f"{order.item} shipped"


@fk.workflow("fulfil")
async def fulfil(ctx: Context, order_id: int) -> str:
    return await ctx.step("ship", ship, order_id)
