"""The rabbitmq sink (being written)."""
