"""bench/embedded.py's dramatiq rows: a no-op actor on dramatiq's Redis broker, at its defaults.

The worker is ``dramatiq --processes 1 bench.peers.dramatiq_tasks`` (8 threads, dramatiq's
default; its default middleware). ``SLUICE_BENCH_REDIS_URL`` names the Redis database.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import dramatiq
from dramatiq.brokers.redis import RedisBroker

URL = os.environ.get("SLUICE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")

# RedisBroker's __init__ has no annotations: called through a typed name, so the module
# checks under mypy --strict with dramatiq installed or not.
make_broker: Callable[..., RedisBroker] = RedisBroker
broker = make_broker(url=URL)
dramatiq.set_broker(broker)

# Where the broker keeps a queue's messages until they are acknowledged (dispatch.lua):
# a message stays in this hash from its enqueue to its ack, so its length is the number of
# tasks not finished yet.
MESSAGES_KEY = "dramatiq:default.msgs"


def _noop() -> None:
    return None


# Registered by a call rather than as a decorator: without dramatiq installed mypy sees Any,
# and an untyped decorator is an error under --strict.
noop = dramatiq.actor(actor_name="noop")(_noop)
