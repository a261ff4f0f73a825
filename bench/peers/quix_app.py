"""bench/kafka.py's quix row: a Quix Streams app forwarding its input topic to its output topic.

Quix's defaults throughout (JSON values, bytes keys, at-least-once, its commit interval and
client settings); only what the bench must set is set: the brokers, an own consumer group,
``auto_offset_reset="earliest"`` (the input topic is full before the app starts) and a state
directory in the run's scratch directory. Run by the interpreter of bench/peers/quix_env.py
with the environment BROKERS, GROUP, IN, OUT (and STATE_DIR).
"""

from __future__ import annotations

import os
from typing import Any

from quixstreams import Application


def noop(value: Any) -> Any:
    return value


def main() -> None:
    app = Application(broker_address=os.environ["BROKERS"], consumer_group=os.environ["GROUP"],
                      auto_offset_reset="earliest",
                      state_dir=os.environ.get("STATE_DIR", "state"))
    source = app.topic(os.environ["IN"])
    out = app.topic(os.environ["OUT"])
    sdf = app.dataframe(source)
    sdf = sdf.apply(noop)
    sdf.to_topic(out)
    app.run()


if __name__ == "__main__":
    main()
