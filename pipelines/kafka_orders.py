"""Handler of the Kafka walk-through (docs/kafka.md): prices an order.

Payload: ``{"item": "book", "qty": 2}``. An unknown item or a quantity that is not a positive
integer is rejected at once (no retry): the message goes to the dead-letter topic.
"""

from __future__ import annotations

from typing import Any

from sluice import Message, Reject

PRICE_CENTS = {"book": 1250, "pen": 199, "lamp": 3400}


async def price(message: Message) -> dict[str, Any]:
    order = message.payload
    if not isinstance(order, dict) or order.get("item") not in PRICE_CENTS:
        raise Reject(f"unknown item in {order!r}")
    qty = order.get("qty", 1)
    if not isinstance(qty, int) or isinstance(qty, bool) or qty <= 0:
        raise Reject(f"qty must be a positive integer, got {qty!r}")
    return {"customer": message.key, "item": order["item"], "qty": qty,
            "total_cents": PRICE_CENTS[order["item"]] * qty}
