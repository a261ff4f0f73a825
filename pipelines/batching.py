"""A batch handler: prices many orders in one call, one outcome per order, in order."""

from __future__ import annotations

from typing import Any

from sluice import Message, Reject

PRICE_CENTS = {"book": 1250, "pen": 199}


async def price_orders(messages: list[Message]) -> list[Any]:
    # One call for up to handler.batch.max_size messages: e.g. one database query or one
    # request to a model server for all of them. Each item of the answer is that message's
    # outcome: a value (its result) or an exception (Reject, Retry, any other) for it alone.
    out: list[Any] = []
    for message in messages:
        order = message.payload
        price = PRICE_CENTS.get(order.get("item"))
        out.append(Reject(f"unknown item {order.get('item')!r}") if price is None
                   else {"item": order["item"], "total_cents": price * order["qty"]})
    return out
