"""A gone worker's messages on Redis: put back by a live worker about ``gone_after`` + ``heartbeat`` seconds after its
last beat (nocluster/queue/backends/gone_workers.py), never while it is only paused; on RabbitMQ the broker does it.

The first tests drive :class:`GoneWorkers` against the real Redis with deliveries held by a real process that
died (no Celery worker needed); the others run real Celery workers, killed with SIGKILL or paused with SIGSTOP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Exchange, Queue

from nocluster import Application
from nocluster.queue.backends.gone_workers import (
    ALIVE_KEY,
    WORKERS_KEY,
    GoneWorkers,
    Liveness,
    held_deliveries,
    plain_client,
)
from tests.conftest import unique_name
from tests.helpers import ROOT, wait_until
from tests.queue import scenarios
from tests.queue.conftest import (
    CELERY_BACKEND,
    Cluster,
    cleanup,
    cluster_env,
    delete_keys,
    kill_workers_until_recorded_failed,
)
from tests.queue.scenarios import of
from tests.queue.workers import QUEUE_LIMITS, kill_workers, start_workers

pytestmark = pytest.mark.cluster

# A process that takes `count` messages from queue `name` without acknowledging them, as worker `worker` (its own
# unacked hashes), and dies holding them.
HOLD_AND_DIE = """
import os, sys
from kombu import Connection, Queue, Exchange
url, prefix, worker, name, count = sys.argv[1:6]
from nocluster.queue.backends.gone_workers import worker_transport_options
options = {"global_keyprefix": prefix, **worker_transport_options(worker)}
with Connection(url, transport_options=options) as connection:
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)(connection.default_channel)
    held = [queue.get(no_ack=False) for _ in range(int(count))]
    assert all(message is not None for message in held), held
    os._exit(0)
"""


class Broker:
    """One project's Redis keys: a queue, its messages, and deliveries held by dead or live workers."""

    def __init__(self, redis_url: str) -> None:
        self.url = redis_url
        self.name = unique_name("gone")
        self.prefix = f"{self.name}:"
        self.queue_name = f"{self.name}.work"
        self.options = {"global_keyprefix": self.prefix, "visibility_timeout": 3600}

    def connect(self, extra: dict[str, object] | None = None) -> Connection:
        return Connection(self.url, transport_options={**self.options, **(extra or {})})

    def queue(self, connection: Connection) -> Queue:
        exchange = Exchange(self.queue_name, type="direct")
        return Queue(self.queue_name, exchange, routing_key=self.queue_name)(connection.default_channel)

    def publish(self, count: int) -> None:
        with self.connect() as connection:
            queue = self.queue(connection)
            queue.declare()
            producer = connection.Producer()
            for number in range(count):
                producer.publish({"n": number}, exchange=queue.exchange, routing_key=self.queue_name, serializer="json")

    def hold_and_die(self, worker: str, count: int) -> None:
        """A real process takes ``count`` messages as ``worker`` and exits without acknowledging them."""
        args = [self.url, self.prefix, worker, self.queue_name, str(count)]
        subprocess.run([sys.executable, "-c", HOLD_AND_DIE, *args], cwd=ROOT, check=True, timeout=60)

    def list_worker(self, worker: str, alive: bool) -> None:
        client = redis.Redis.from_url(self.url)
        client.hset(self.prefix + WORKERS_KEY, worker, json.dumps({"host": "test", "pid": 0}))
        if alive:
            client.set(self.prefix + ALIVE_KEY.format(worker), "{}", ex=60)

    def waiting(self) -> list[dict[str, object]]:
        """Take every message waiting on the queue (acknowledged), with its redelivered flag."""
        taken = []
        with self.connect() as connection:
            queue = self.queue(connection)
            while (message := queue.get(no_ack=True)) is not None:
                taken.append({**message.decode(), "redelivered": message.delivery_info.get("redelivered", False)})
        return taken

    def gone_workers(self, instance_id: str = "restorer") -> GoneWorkers:
        return GoneWorkers(self.connect, instance_id, Liveness(heartbeat=0.5, gone_after=1.0))

    def held(self) -> int:
        with self.connect() as connection:
            return held_deliveries(*plain_client(connection))


@pytest.fixture
def broker(redis_url: str) -> Iterator[Broker]:
    result = Broker(redis_url)
    yield result
    delete_keys(result.name)


def test_a_dead_worker_s_deliveries_go_back_on_their_queue_once_marked_redelivered(broker: Broker) -> None:
    # Given 3 messages taken and held by a worker process that died, and 2 still waiting on the queue
    broker.publish(5)
    broker.hold_and_die("dead", 3)
    broker.list_worker("dead", alive=False)
    assert broker.held() == 3

    # When a live worker looks for gone workers
    gone = broker.gone_workers()
    client, prefix = plain_client(broker.connect())
    restored = gone.restore_gone(client, prefix)

    # Then the 3 are back on the queue, marked redelivered, nothing is held, and the dead worker is forgotten
    assert restored == 3
    waiting = broker.waiting()
    assert sorted(int(str(m["n"])) for m in waiting) == [0, 1, 2, 3, 4]
    assert sum(bool(m["redelivered"]) for m in waiting) == 3
    assert broker.held() == 0
    assert not client.hexists(prefix + WORKERS_KEY, "dead")
    # And a second look finds nothing more to do
    assert gone.restore_gone(client, prefix) == 0


def test_a_dead_worker_that_was_never_listed_is_found_by_its_hash(broker: Broker) -> None:
    # Given 2 messages held by a worker process that died before it listed itself (its first beat failed)
    broker.publish(2)
    broker.hold_and_die("unlisted", 2)

    # When a live worker looks for gone workers, it finds the hash and puts both back
    client, prefix = plain_client(broker.connect())
    assert broker.gone_workers().restore_gone(client, prefix) == 2
    assert len(broker.waiting()) == 2 and broker.held() == 0


def test_a_live_worker_s_deliveries_stay_where_they_are(broker: Broker) -> None:
    # Given 2 messages held by a worker whose liveness key has not expired (it is only slow)
    broker.publish(2)
    broker.hold_and_die("slow", 2)
    broker.list_worker("slow", alive=True)

    # When another worker looks for gone workers, nothing is restored
    client, prefix = plain_client(broker.connect())
    assert broker.gone_workers().restore_gone(client, prefix) == 0
    assert broker.waiting() == [] and broker.held() == 2

    # And once its key expires (the worker is gone), they are
    client.delete(prefix + ALIVE_KEY.format("slow"))
    assert broker.gone_workers().restore_gone(client, prefix) == 2
    assert len(broker.waiting()) == 2


def test_workers_looking_at_once_put_each_message_back_once(broker: Broker) -> None:
    # Given 20 messages held by a dead worker
    broker.publish(20)
    broker.hold_and_die("dead", 20)
    broker.list_worker("dead", alive=False)

    # When 4 live workers look for gone workers at the same moment
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def look(number: int) -> None:
        try:
            gone = broker.gone_workers(f"live{number}")
            client, prefix = plain_client(broker.connect())
            barrier.wait(10)
            gone.restore_gone(client, prefix)
        except BaseException as exc:  # pragma: no cover (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=look, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors

    # Then each message is on the queue exactly once (kombu's mutex and its WATCHed transaction)
    waiting = broker.waiting()
    assert sorted(int(str(m["n"])) for m in waiting) == list(range(20))


def test_a_worker_beats_and_forgets_itself_when_it_stops(broker: Broker) -> None:
    # Given a worker's GoneWorkers started (its thread beats)
    gone = broker.gone_workers("me")
    gone.start()
    client, prefix = plain_client(broker.connect())
    try:
        # Then it is listed, with a liveness key that expires gone_after + heartbeat after its last beat
        assert client.hexists(prefix + WORKERS_KEY, "me")
        ttl = client.pttl(prefix + ALIVE_KEY.format("me"))
        assert 0 < ttl <= 1500
    finally:
        gone.stop()
    # And once stopped it is neither listed nor alive
    assert not client.hexists(prefix + WORKERS_KEY, "me")
    assert not client.exists(prefix + ALIVE_KEY.format("me"))


# --- real Celery workers ---------------------------------------------------------------------------------------------
def default_cluster(broker_url: str, database_url: str, redis_url: str, env: dict[str, str]) -> Cluster:
    """Two workers of a fresh project with the settings' defaults, except those in ``env``."""
    name = unique_name("gw")
    worker_env = cluster_env(name, broker_url, database_url, redis_url)
    worker_env = {key: value for key, value in worker_env.items() if key not in QUEUE_LIMITS}
    worker_env.update(env)
    options: dict[str, object] = {"broker_url": broker_url}
    app = Application({"NAME": name, "EVENT_QUEUE": {"BACKEND": CELERY_BACKEND, "OPTIONS": options}})
    scenarios.register(app)
    result = Cluster(name, "redis", app, worker_env)
    result.workers = start_workers([f"g1-{name}", f"g2-{name}"], worker_env, include=result.include)
    return result


@pytest.fixture
def defaults_cluster(worker_database_url: str, redis_url: str) -> Iterator[Cluster]:
    """Celery on Redis with every default (visibility timeout 1,620 s, gone_after 15 s, heartbeat 5 s)."""
    result = default_cluster(redis_url, worker_database_url, redis_url, {})
    try:
        yield result
    finally:
        kill_workers(result.workers)
        cleanup(result, redis_url)


@pytest.fixture(scope="module")
def quick_cluster(worker_database_url: str, redis_url: str) -> Iterator[Cluster]:
    """Celery on Redis whose workers count as gone after 3 s without a beat (heartbeat 0.5 s); every other setting
    is the default (a visibility timeout of 1,620 s: only the gone-worker restore brings a message back in time)."""
    env = {"NOCLUSTER_HEARTBEAT": "0.5", "NOCLUSTER_NODE_GONE_AFTER": "3"}
    result = default_cluster(redis_url, worker_database_url, redis_url, env)
    try:
        yield result
    finally:
        for worker in result.workers:
            if worker.alive:
                os.killpg(worker.pid, signal.SIGCONT)
        kill_workers(result.workers)
        cleanup(result, redis_url)


def started_on(cluster: Cluster, message_id: str, count: int = 1, timeout: float = 30.0) -> list[dict[str, object]]:
    return wait_until(
        lambda: (found := of(cluster.events("long-start"), message_id)) and len(found) >= count and found,
        timeout=timeout,
        message=f"{count} start(s) of {message_id}",
    )


def test_a_killed_worker_s_message_runs_again_within_30_s_on_redis_with_the_defaults(
    defaults_cluster: Cluster, transactional_db: None
) -> None:
    cluster = defaults_cluster
    # Given a 10 s message running on a worker, with every default (the visibility timeout is 1,620 s)
    message_id = cluster.app.event_queue.publish("long", {"sleep": 10}, timeout=60)
    victim = cluster.worker_of(int(str(started_on(cluster, message_id)[0]["node"])))
    survivor = next(worker for worker in cluster.workers if worker is not victim)

    # When its worker is killed with SIGKILL (main process and pool)
    victim.kill()
    killed_at = time.monotonic()

    # Then the other worker puts it back and runs it within 30 s, and it completes once, there
    again = started_on(cluster, message_id, count=2, timeout=40)
    elapsed = time.monotonic() - killed_at
    print(f"\nkilled worker's message started again after {elapsed:.1f} s (Redis, defaults)")
    assert elapsed < 30
    assert again[1]["node"] == survivor.pid
    done = wait_until(lambda: of(cluster.events("long-done"), message_id), timeout=30)
    assert len(done) == 1 and done[0]["node"] == survivor.pid
    assert "is gone; put back 1 message(s)" in survivor.log_text()
    cluster.drain()
    assert len(of(cluster.events("long-start"), message_id)) == 2


@pytest.mark.parametrize("broker_kind", ["redis", "amqp"])
def test_a_worker_paused_for_less_than_gone_after_runs_its_message_once(
    request: pytest.FixtureRequest, broker_kind: str, transactional_db: None
) -> None:
    # On Redis a worker counts as gone after 3 s without a beat (heartbeat 0.5 s); RabbitMQ has its own consumer
    # liveness (AMQP heartbeats, 120 s)
    cluster: Cluster = request.getfixturevalue("quick_cluster" if broker_kind == "redis" else "amqp_cluster")
    # Given a 1 s message running on a worker
    message_id = cluster.app.event_queue.publish("long", {"sleep": 1}, timeout=6)
    victim = cluster.worker_of(int(str(started_on(cluster, message_id)[0]["node"])))

    # When the whole worker is paused (SIGSTOP) for 2 s, less than gone_after, and resumed
    os.killpg(victim.pid, signal.SIGSTOP)
    try:
        time.sleep(2)  # the pause itself, not a wait for something not to happen
    finally:
        os.killpg(victim.pid, signal.SIGCONT)

    # Then it finishes the message there, and the message ran once: nobody took the paused worker for gone
    done = wait_until(lambda: of(cluster.events("long-done"), message_id), timeout=30)
    cluster.drain()
    assert len(of(cluster.events("long-start"), message_id)) == 1
    assert done[0]["node"] == victim.pid


def test_a_worker_paused_for_longer_than_gone_after_has_its_message_run_by_another(
    quick_cluster: Cluster, transactional_db: None
) -> None:
    cluster = quick_cluster
    # Given a 3 s message running on a worker that counts as gone after 3 s without a beat (heartbeat 0.5 s)
    message_id = cluster.app.event_queue.publish("long", {"sleep": 3}, timeout=6)
    victim = cluster.worker_of(int(str(started_on(cluster, message_id)[0]["node"])))
    survivor = next(worker for worker in cluster.workers if worker is not victim)

    # When the whole worker is paused for longer (until the other worker has started the message)
    os.killpg(victim.pid, signal.SIGSTOP)
    try:
        again = started_on(cluster, message_id, count=2, timeout=20)
    finally:
        os.killpg(victim.pid, signal.SIGCONT)

    # Then the other worker ran it: what decides is the beat, so a pause past gone_after is a second run (documented)
    assert again[1]["node"] == survivor.pid
    cluster.drain()


def test_a_message_that_keeps_killing_its_whole_worker_on_redis_is_recorded_failed(
    quick_cluster: Cluster, transactional_db: None
) -> None:
    cluster = quick_cluster
    # Given work that kills its whole worker every time, on a supervised cluster on Redis
    message_id = cluster.app.event_queue.publish("kill-worker", None, timeout=6)

    # When every killed worker is started again, the message comes back each time from the gone worker's hash
    record = kill_workers_until_recorded_failed(cluster, message_id)

    # Then it killed its worker max_deliveries (5) times, was recorded failed, and ran no more
    assert "its worker died 5 times" in record.error
    assert len(of(cluster.events("kill-worker"), message_id)) == 5
