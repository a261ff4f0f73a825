"""Handler of the MQTT walk-through (docs/mqtt.md): prices an order, as the Kafka one does
(:mod:`pipelines.kafka_orders`); the customer is the message's key (a topic level)."""

from __future__ import annotations

from pipelines.kafka_orders import PRICE_CENTS, price

__all__ = ["PRICE_CENTS", "price"]
