"""The rabbitmq source (being written)."""
