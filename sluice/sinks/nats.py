"""The nats sink (being written)."""
