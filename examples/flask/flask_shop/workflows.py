"""The shop's workflows: a welcome sequence and an order's fulfilment."""

from __future__ import annotations

from pydantic import BaseModel

from flowkeeper import Context, FlowKeeper

fk = FlowKeeper()  # DATABASE_URL, FLOWKEEPER_SIGNING_KEY, FLOWKEEPER_ENDPOINT


class User(BaseModel):
    email: str
    name: str


def send_welcome(user: User) -> str:
    return f"welcome mail sent to {user.email}"  # a sync step runs in a thread


@fk.workflow("welcome")
async def welcome(ctx: Context, user: User) -> str:
    return await ctx.step("send-welcome", send_welcome, user)


def ship(order_id: int) -> str:
    return f"order {order_id} shipped"


@fk.workflow("fulfil")
async def fulfil(ctx: Context, order_id: int) -> str:
    return await ctx.step("ship", ship, order_id)
