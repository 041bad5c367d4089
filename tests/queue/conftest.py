"""Fixtures of the queue tests: a cluster of real Celery workers per broker, shared by the tests of a module."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings
from kombu import Connection

from nocluster import Application
from nocluster.queue.backends.celery import celery_queue
from settings.test import RUN_ID
from tests.conftest import server_unavailable
from tests.helpers import wait_until
from tests.queue import scenarios
from tests.queue.workers import QUEUE_LIMITS, Worker, start_workers, stop_workers

CELERY_BACKEND = "nocluster.queue.backends.celery.CeleryQueueBackend"
_names = itertools.count(1)


@dataclass
class Cluster:
    """Workers of one project (``name``) on one broker, and an Application that publishes to them."""

    name: str
    broker: str
    broker_url: str
    env: dict[str, str]
    app: Application
    workers: list[Worker] = field(default_factory=list)
    include: str = "tests.queue.worker_scenarios"

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return scenarios.events(self.name, kind)

    def wait_events(self, kind: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.events(kind)) >= count, timeout=timeout, message=f"{count} {kind!r} events")
        return self.events(kind)

    def worker_of(self, node_pid: int) -> Worker:
        return next(worker for worker in self.workers if worker.pid == node_pid)

    def replace(self, worker: Worker) -> Worker:
        """Stop (or reap) ``worker`` and start a fresh one in its place."""
        worker.stop()
        fresh = Worker(f"{worker.name}r", self.env, include=self.include).wait_ready()
        self.workers[self.workers.index(worker)] = fresh
        return fresh


@pytest.fixture(scope="module")
def worker_database_url(django_db_setup: None, django_db_blocker: Any) -> str:
    """This run's test database, for worker processes (tests see their rows with ``transactional_db``)."""
    with django_db_blocker.unblock():
        params = connection.settings_dict
        if connection.vendor != "postgresql":
            server_unavailable("PostgreSQL", str(params.get("NAME")))
        user = params.get("USER") or "postgres"
        password = f":{params['PASSWORD']}" if params.get("PASSWORD") else ""
        host, port = params.get("HOST") or "127.0.0.1", params.get("PORT") or 5432
        return f"postgres://{user}{password}@{host}:{port}/{params['NAME']}"


@pytest.fixture(scope="module")
def queue_limits() -> Iterator[dict[str, str]]:
    """The short queue limits in this process too (the publisher computes time limits from them)."""
    with override_settings(**{key: float(value) for key, value in QUEUE_LIMITS.items()}):
        yield QUEUE_LIMITS


def cluster_env(name: str, broker_url: str, database_url: str, redis_url: str) -> dict[str, str]:
    return {
        "DJANGO_ENV": "test",
        "DJANGO_SETTINGS_MODULE": "settings",
        "NOCLUSTER_TEST_RUN": RUN_ID,
        "NOCLUSTER_NAME": name,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "BROKER_URL": broker_url,
        **QUEUE_LIMITS,
    }


def publisher(name: str, broker_url: str) -> Application:
    app = Application({"NAME": name, "EVENT_QUEUE": {"BACKEND": CELERY_BACKEND, "OPTIONS": {"broker_url": broker_url}}})
    scenarios.register(app)
    return app


def cleanup(cluster: Cluster) -> None:
    """Delete this project's queues on the broker and its keys in Redis (never a FLUSHDB)."""
    queues = [celery_queue(cluster.app.event_queue.full_channel(c)) for c in cluster.app.event_queue.channels()]
    try:
        with Connection(cluster.broker_url) as conn:
            channel = conn.default_channel
            for queue in queues:
                queue(channel).delete()
    except Exception as exc:  # best effort: the names are unique to this run anyway
        print(f"queues of {cluster.name} not deleted: {exc}")
    client = scenarios.client()
    for key in client.scan_iter(match=f"{cluster.name}:*", count=500):
        client.delete(key)


@pytest.fixture(scope="module", params=["redis", "amqp"])
def cluster(
    request: pytest.FixtureRequest, worker_database_url: str, redis_url: str, queue_limits: dict[str, str]
) -> Iterator[Cluster]:
    """Two workers (3 prefork processes each) of a fresh project on one real broker, for this module."""
    broker_url = request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url")
    name = f"t{RUN_ID}-q{next(_names)}"
    env = cluster_env(name, broker_url, worker_database_url, redis_url)
    result = Cluster(name, request.param, broker_url, env, publisher(name, broker_url))
    result.workers = start_workers([f"w1-{name}", f"w2-{name}"], env, include=result.include)
    try:
        yield result
    finally:
        stop_workers(result.workers)
        cleanup(result)
