"""Talking to the real nats broker in tests (its conformance connector: ``connector``)."""
