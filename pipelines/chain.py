"""Handlers of the chained example: `orders` prices an order; its result record goes, through
an embedded destination, to `receipts`, which turns it into a receipt."""

from __future__ import annotations

from typing import Any

from sluice import Message, Reject

PRICE_CENTS = {"book": 1250, "pen": 199}


async def price_order(message: Message) -> dict[str, Any]:
    order = message.payload
    if order.get("item") not in PRICE_CENTS:
        raise Reject(f"unknown item {order.get('item')!r}")
    return {"item": order["item"], "total_cents": PRICE_CENTS[order["item"]] * order["qty"]}


async def write_receipt(message: Message) -> dict[str, Any]:
    record = message.payload  # a sluice result record (a CloudEvent)
    priced = record["data"]["result"]
    return {"receipt_for": record["data"]["task_id"], "total_cents": priced["total_cents"]}
