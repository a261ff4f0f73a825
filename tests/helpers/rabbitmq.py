"""Talking to the real rabbitmq broker in tests (its conformance connector: ``connector``)."""
