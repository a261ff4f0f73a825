"""bench/embedded.py's arq rows: a no-op job function for arq's worker, at its defaults.

The worker is ``arq bench.peers.arq_tasks.WorkerSettings``: everything but the function and the
Redis database is arq's default (max_jobs 10, poll_delay 0.5 s, results kept an hour, a log
line per job start and end at INFO). ``SLUICE_BENCH_REDIS_URL`` names the Redis database.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from arq.connections import RedisSettings
from arq.constants import default_queue_name

URL = os.environ.get("SLUICE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")

# The queue is a sorted set of job ids; a job leaves it when it finishes (Worker.finish_job),
# so its size is the number of jobs not finished yet.
QUEUE_KEY = default_queue_name


async def noop(ctx: dict[str, Any]) -> None:
    return None


class WorkerSettings:
    functions: ClassVar[list[Any]] = [noop]
    redis_settings = RedisSettings.from_dsn(URL)
