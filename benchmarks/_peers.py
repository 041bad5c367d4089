"""The event queue's peers in ``event_queue.py``: raw Celery with its default worker, and Dramatiq's default worker.

Both do the same trivial work as the event queue's path (one ``RPUSH`` of ``[index, start time]``), on the same
broker, under the benchmark's own names (``NOCLUSTER_NAME``, ``BROKER_URL`` and ``REDIS_URL`` from the driver):

- ``celery_app``: a Celery app with Celery's defaults (early ack, prefetch 4 per process, no time limits), its
  queue and Redis keys under the benchmark's name; run as ``celery -A benchmarks._peers:celery_app worker``;
- ``dramatiq_noop``: a Dramatiq actor on a broker of its own for this run (``python -m dramatiq benchmarks._peers``
  with no other flag: a process per core, 8 threads each).

Dramatiq and pika are benchmark-only requirements (``benchmarks/requirements.txt``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import dramatiq
import redis
from celery import Celery

NAME = os.environ.get("NOCLUSTER_NAME", "bench")
BROKER_URL = os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_QUEUE = f"{NAME}.default"
DRAMATIQ_QUEUE = f"{NAME}.dramatiq"
_client: Any = None


def record(i: int, kind: str) -> None:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(REDIS_URL)
    _client.rpush(f"{NAME}:bench:{kind}", json.dumps([i, time.time()]))


# --- raw Celery, its defaults ----------------------------------------------------------------------------------
celery_app = Celery("bench_default", broker=BROKER_URL, set_as_current=False)
celery_app.conf.task_default_queue = CELERY_QUEUE
# Remote control and events on exchanges of this run, not Celery's shared celery.pidbox and celeryev (as the event
# queue's own app does): nothing else changes, and the run's cleanup deletes them.
celery_app.conf.control_exchange = f"{NAME}:control"
celery_app.conf.event_exchange = celery_app.conf.event_queue_prefix = f"{NAME}:events"
if BROKER_URL.startswith("redis"):
    celery_app.conf.broker_transport_options = {"global_keyprefix": f"{NAME}:"}  # keys under this run's name


@celery_app.task(name="bench.default_noop", ignore_result=True)
def default_noop(i: int, kind: str = "celery_default") -> None:
    record(i, kind)


# --- Dramatiq, its defaults ------------------------------------------------------------------------------------
def dramatiq_broker() -> dramatiq.Broker:
    if BROKER_URL.startswith("redis"):
        from dramatiq.brokers.redis import RedisBroker

        return RedisBroker(url=BROKER_URL, namespace=f"{NAME}:dramatiq")
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    # kombu's "...:5672//" names the vhost "/"; pika reads the path after its first slash, unescaped.
    url = BROKER_URL[: -len("//")] + "/%2F" if BROKER_URL.endswith("//") else BROKER_URL
    return RabbitmqBroker(url=url)


dramatiq.set_broker(dramatiq_broker())


@dramatiq.actor(queue_name=DRAMATIQ_QUEUE)
def dramatiq_noop(i: int, kind: str = "dramatiq") -> None:
    record(i, kind)
