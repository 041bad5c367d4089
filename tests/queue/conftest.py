"""Fixtures of the queue tests: the event queue under test on every backend, with the same handlers and events.

``queue`` gives, for each backend in turn, an Application that publishes and a uniform way to read what the
handlers recorded (:mod:`tests.queue.scenarios`: JSON events on a Redis list) and to drain:

- ``memory`` and ``database``: the in-process backends, consumed by the test process itself (built per test);
- ``redis`` and ``amqp``: Celery on each broker, consumed by two real worker processes (3 prefork processes
  each) shared by the queue tests of the run; each test uses its own message ids.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import connection
from kombu import Connection

from nocluster import Application
from nocluster.models import FailedMessage
from nocluster.queue.backends.celery import celery_queue
from settings.test import RUN_ID
from tests.conftest import server_unavailable, unique_name
from tests.helpers import wait_until
from tests.queue import scenarios
from tests.queue.workers import LIMIT_OPTIONS, QUEUE_LIMITS, Worker, kill_workers, start_workers

CELERY_BACKEND = "nocluster.queue.backends.celery.CeleryQueueBackend"
IN_PROCESS = {
    "memory": "nocluster.queue.backends.memory.MemoryQueueBackend",
    "database": "nocluster.queue.backends.database.DatabaseQueueBackend",
}
IN_PROCESS_OPTIONS = {"retry_backoff": 0.05, "retry_backoff_max": 0.2, "grace": 0.5, "poll_interval": 0.05}
BACKENDS = ["memory", "database", "redis", "amqp"]


@dataclass
class Cluster:
    """The event queue of one project (``name``) on one backend, and an Application that publishes to it."""

    name: str
    broker: str
    app: Application
    env: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)
    include: str = "tests.queue.worker_scenarios"

    @property
    def celery(self) -> bool:
        return self.broker in {"redis", "amqp"}

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return scenarios.events(self.name, kind)

    def wait_events(self, kind: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.events(kind)) >= count, timeout=timeout, message=f"{count} {kind!r} events")
        return self.events(kind)

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until nothing of this project is queued, delayed, held or running (AssertionError after it)."""
        if not self.app.event_queue.drain(timeout):
            depths = self.app.event_queue.depths()
            logs = "".join(f"\n--- {worker.name}:\n{worker.log_text()[-2000:]}" for worker in self.workers)
            raise AssertionError(f"the queue on {self.broker} did not drain in {timeout} s: depths {depths}{logs}")

    def worker_of(self, node_pid: int) -> Worker:
        return next(worker for worker in self.workers if worker.pid == node_pid)

    def replace(self, worker: Worker) -> Worker:
        """Stop (or reap) ``worker`` and start a fresh one in its place."""
        worker.stop()
        fresh = Worker(f"{worker.name}r", self.env, include=self.include).wait_ready()
        self.workers[self.workers.index(worker)] = fresh
        return fresh


@pytest.fixture(scope="session")
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


def celery_publisher(name: str, broker_url: str) -> Application:
    options = {"broker_url": broker_url, **LIMIT_OPTIONS}
    app = Application({"NAME": name, "EVENT_QUEUE": {"BACKEND": CELERY_BACKEND, "OPTIONS": options}})
    scenarios.register(app)
    return app


def cleanup(cluster: Cluster, broker_url: str) -> None:
    """Delete this project's queues on the broker and its keys in Redis (never a FLUSHDB)."""
    queues = [celery_queue(cluster.app.event_queue.full_channel(c)) for c in cluster.app.event_queue.channels()]
    try:
        with Connection(broker_url) as conn:
            channel = conn.default_channel
            for queue in queues:
                queue(channel).delete()
    except Exception as exc:  # best effort: the names are unique to this run anyway
        print(f"queues of {cluster.name} not deleted: {exc}")
    delete_keys(cluster.name)


def delete_keys(name: str) -> None:
    client = scenarios.client()
    for key in client.scan_iter(match=f"{name}:*", count=500):
        client.delete(key)


# The shared clusters' workers count as gone after 4 s without a beat (heartbeat 1 s), so that a test killing one
# on Redis waits about 5 s for its message to come back, not the defaults' 20 s (test_gone_workers.py tests those).
SHARED_LIVENESS = {"NOCLUSTER_HEARTBEAT": "1", "NOCLUSTER_NODE_GONE_AFTER": "4"}


def start_celery_cluster(broker: str, broker_url: str, database_url: str, redis_url: str) -> Cluster:
    name = unique_name("q")
    env = {**cluster_env(name, broker_url, database_url, redis_url), **SHARED_LIVENESS}
    result = Cluster(name, broker, celery_publisher(name, broker_url), env)
    result.workers = start_workers([f"w1-{name}", f"w2-{name}"], env, include=result.include)
    return result


@pytest.fixture(scope="session")
def redis_cluster(worker_database_url: str, redis_url: str) -> Iterator[Cluster]:
    """Two workers of a fresh project on the real Redis broker, shared by the queue tests of the run."""
    yield from _celery_cluster("redis", redis_url, worker_database_url, redis_url)


@pytest.fixture(scope="session")
def amqp_cluster(worker_database_url: str, redis_url: str, amqp_url: str) -> Iterator[Cluster]:
    """Two workers of a fresh project on the real RabbitMQ broker, shared by the queue tests of the run."""
    yield from _celery_cluster("amqp", amqp_url, worker_database_url, redis_url)


def _celery_cluster(broker: str, broker_url: str, database_url: str, redis_url: str) -> Iterator[Cluster]:
    result = start_celery_cluster(broker, broker_url, database_url, redis_url)
    try:
        yield result
    finally:
        kill_workers(result.workers)
        cleanup(result, broker_url)


@pytest.fixture(params=BACKENDS)
def queue(request: pytest.FixtureRequest, transactional_db: None) -> Cluster:
    """The event queue on each backend in turn (see the module docstring)."""
    if request.param in IN_PROCESS:
        return _in_process(request)
    return request.getfixturevalue(f"{request.param}_cluster")


def _in_process(request: pytest.FixtureRequest) -> Cluster:
    kind = request.param
    name = unique_name("m")
    app = Application({"NAME": name, "EVENT_QUEUE": {"BACKEND": IN_PROCESS[kind], "OPTIONS": IN_PROCESS_OPTIONS}})
    scenarios.register(app)
    app.event_queue.start()

    def finish() -> None:
        app.event_queue.stop()
        delete_keys(name)

    request.addfinalizer(finish)
    return Cluster(name, kind, app)


@pytest.fixture(params=["redis", "amqp"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """Celery on each broker in turn (for what only the Celery backend has)."""
    return request.getfixturevalue(f"{request.param}_cluster")


def kill_workers_until_recorded_failed(cluster: Cluster, message_id: str) -> FailedMessage:
    """Start again every worker ``message_id`` kills (as systemd would; it may die again before it says ready)
    until the message is recorded failed; return the record once the queue drained."""
    restarts = itertools.count(1)

    def recorded_or_restart() -> bool:
        for index, worker in enumerate(cluster.workers):
            if not worker.alive:
                worker.stop()
                name = f"k{next(restarts)}-{cluster.name}"
                cluster.workers[index] = Worker(name, cluster.env, include=cluster.include)
        return FailedMessage.objects.filter(message_id=message_id).exists()

    try:
        wait_until(recorded_or_restart, timeout=180, interval=0.2, message="the failed record")
    except AssertionError as exc:
        logs = "".join(f"\n--- worker {w.name}:\n{w.log_text()[-3000:]}" for w in cluster.workers)
        raise AssertionError(f"{exc}; the workers' logs end:{logs}") from None
    for worker in cluster.workers:
        worker.wait_ready()
    cluster.drain()
    return FailedMessage.objects.get(message_id=message_id)
