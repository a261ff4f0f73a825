"""Payload decoding (sluice/message.py)."""

from __future__ import annotations

import json

import pytest

from sluice.message import decode_payload, loads_json

BODIES = [
    b'{"id": 18446744073709551616, "neg": -9223372036854775809}',  # beyond 64 bits
    b'{"n": 1234567890123456789012345, "f": 0.1, "s": "caf\xc3\xa9"}',
    b'{"x": NaN, "y": -Infinity}',  # accepted by json.loads, refused by orjson
    '{"a": [1, 2.5, null, true]}'.encode("utf-16"),
    b'[1e400]',
    b'{"a": 1, "a": 2}',
]


@pytest.mark.parametrize("body", BODIES)
def test_json_bodies_decode_to_what_json_loads_gives(body: bytes) -> None:
    assert repr(loads_json(body)) == repr(json.loads(body))


def test_an_integer_beyond_64_bits_stays_exact() -> None:
    value = decode_payload(b'{"id": 18446744073709551616}', "application/json")
    assert value["id"] == 18446744073709551616 and isinstance(value["id"], int)


def test_a_body_that_is_not_json_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        decode_payload(b"{nope", "application/json")
    assert decode_payload(b"caf\xc3\xa9", "text/plain") == "café"
    assert decode_payload(b"\x00\x01", "application/octet-stream") == b"\x00\x01"
