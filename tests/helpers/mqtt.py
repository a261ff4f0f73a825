"""Talking to the real mqtt broker in tests (its conformance connector: ``connector``)."""
