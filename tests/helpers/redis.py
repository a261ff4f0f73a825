"""Talking to the real redis broker in tests (its conformance connector: ``connector``)."""
