"""The nats source (being written)."""
