"""Long delays wait in the database, not in a Celery worker (:mod:`nocluster.queue.parking`).

A worker holds at most two countdown messages per pool process; before parking, a backlog of delayed messages
took those places and the messages behind it in the broker waited for the whole backlog to cycle through.
Here real workers on each broker run what is due while hundreds of messages wait an hour in the database.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.utils import timezone

from nocluster.models import ParkedMessage
from nocluster.queue.message import Message
from nocluster.queue.parking import ParkedMessages
from tests.conftest import unique_name
from tests.helpers import wait_until
from tests.queue.conftest import Cluster, celery_publisher, cleanup, cluster_env
from tests.queue.scenarios import of
from tests.queue.workers import kill_workers, start_workers

pytestmark = pytest.mark.cluster


def parked(cluster: Cluster) -> int:
    return ParkedMessage.objects.filter(app_name=cluster.name).count()


# A worker that holds a countdown message up to 30 s (production holds one up to 60 s, the other tests' workers 2 s).
LONG_HOP = {"NOCLUSTER_QUEUE_RETRY_BACKOFF_MAX": "30"}


@pytest.fixture(params=["redis", "amqp"])
def long_hop(request: pytest.FixtureRequest, worker_database_url: str, redis_url: str) -> Iterator[Cluster]:
    """One worker (two pool processes) of a fresh project on each broker, holding a countdown up to 30 s."""
    broker_url = redis_url if request.param == "redis" else request.getfixturevalue("amqp_url")
    name = unique_name("park")
    env = {**cluster_env(name, broker_url, worker_database_url, redis_url), **LONG_HOP}
    publisher = celery_publisher(name, broker_url)
    publisher.event_queue.backend.longest_delay = 30.0
    cluster = Cluster(name, request.param, publisher, env)
    cluster.workers = start_workers([f"p1-{name}"], env, concurrency=2, include=cluster.include)
    try:
        yield cluster
    finally:
        kill_workers(cluster.workers)
        cleanup(cluster, broker_url)


def test_a_backlog_of_long_delays_waits_in_the_database_and_holds_nothing_back(
    long_hop: Cluster, transactional_db: None
) -> None:
    queue = long_hop.app.event_queue
    # Given 300 messages delayed by an hour on a channel
    delayed = [queue.publish("echo", {"n": n}, timeout=5, delay=3600) for n in range(300)]
    assert parked(long_hop) == 300 and queue.depths()["echo"] == 0  # in the database, not in the broker

    # When 30 messages are published for now, on the same channel, behind them
    published = time.time()
    ready = [queue.publish("echo", {"n": n}, timeout=5) for n in range(30)]

    # Then the 30 run at once. Without parking they waited 30 s behind the backlog: the worker held 4 delayed
    # messages (2 per pool process) for a 30 s hop each and fetched nothing else meanwhile.
    wait_until(lambda: set(ready) <= {e["id"] for e in long_hop.events("echo")}, timeout=15, message="30 echo runs")
    print(f"{long_hop.broker}: 30 messages behind 300 parked ones ran within {time.time() - published:.2f} s")
    # And a cancel removes a parked message; none of the delayed ones ran or reached the broker
    assert queue.cancel(delayed[0]) is False
    assert parked(long_hop) == 299 and queue.depths()["echo"] == 0
    assert not set(delayed) & {e["id"] for e in long_hop.events("echo")}
    ParkedMessage.objects.filter(app_name=long_hop.name).delete()


def test_parked_messages_run_each_once_and_never_before_they_are_due(cluster: Cluster, transactional_db: None) -> None:
    queue = cluster.app.event_queue
    # Given 60 messages delayed 2.5 s (longer than a worker holds one: parked), released by both workers
    published = time.time()
    ids = [queue.publish("echo", {"n": n}, timeout=5, delay=2.5) for n in range(60)]
    assert parked(cluster) == 60

    # Then each runs exactly once, none before its delay, and nothing stays parked
    wait_until(lambda: set(ids) <= {e["id"] for e in cluster.events("echo")}, timeout=30, message="60 echo runs")
    cluster.drain()
    events = [event for event in cluster.events("echo") if event["id"] in set(ids)]
    assert collections.Counter(event["id"] for event in events) == dict.fromkeys(ids, 1)
    earliest = min(event["t"] for event in events)
    print(f"{cluster.broker}: 60 parked messages ran {earliest - published - 2.5:.3f} s to "
          f"{max(event['t'] for event in events) - published - 2.5:.3f} s after their delay")  # fmt: skip
    assert earliest >= published + 2.5
    assert parked(cluster) == 0


# --- the store, on the test database --------------------------------------------------------------------------
def message(n: int) -> Message:
    return Message("echo", {"n": n}, 5.0, 0)


def test_release_sends_the_due_rows_earliest_first_and_keeps_the_rest(transactional_db: None) -> None:
    store = ParkedMessages("park-test")
    store.park(message(1), 0.4)
    store.park(message(0), 0.0)
    store.park(message(2), 3600)
    sent: list[tuple[Any, float]] = []

    assert store.release_due(lambda m, left: sent.append((m.payload["n"], left))) == 2

    assert [n for n, _ in sent] == [0, 1] and 0 <= sent[0][1] <= sent[1][1] <= 0.4
    assert store.counts() == {"echo": 1} and store.count() == 1
    assert store.release_due(lambda m, left: sent.append((m, left))) == 0


def test_a_failing_send_keeps_its_row_and_the_later_ones_and_deletes_those_sent(transactional_db: None) -> None:
    store = ParkedMessages("park-test")
    for n in range(3):
        store.park(message(n), 0.0)
    sent: list[int] = []

    def send(m: Message, left: float) -> None:
        if m.payload["n"] == 1:
            raise ConnectionError("broker unreachable")
        sent.append(m.payload["n"])

    with pytest.raises(ConnectionError):
        store.release_due(send)
    assert sent == [0] and store.count() == 2  # row 0 sent and deleted; 1 and 2 wait for the next release
    assert store.release_due(lambda m, left: sent.append(m.payload["n"])) == 2
    assert sent == [0, 1, 2] and store.count() == 0


def test_a_row_that_is_not_a_message_is_dropped_not_retried_for_ever(transactional_db: None) -> None:
    store = ParkedMessages("park-test")
    ParkedMessage.objects.create(
        app_name="park-test", channel="echo", message_id="x", body={"id": 1}, due=timezone.now()
    )
    store.park(message(7), 0.0)
    sent: list[int] = []
    assert store.release_due(lambda m, left: sent.append(m.payload["n"])) == 2
    assert sent == [7] and store.count() == 0


def test_a_message_that_cannot_be_parked_is_sent_with_a_countdown(cluster: Cluster, transactional_db: None) -> None:
    event_queue = cluster.app.event_queue

    class Unwritable(ParkedMessages):
        def park(self, message: Message, delay: float) -> None:
            raise ConnectionError("database unreachable")

    real, event_queue.parking = event_queue.parking, Unwritable(cluster.name)
    try:
        published = time.time()
        message_id = event_queue.publish("echo", {}, timeout=5, delay=2.5)
    finally:
        event_queue.parking = real
    wait_until(lambda: of(cluster.events("echo"), message_id), timeout=30, message="the echo run")
    assert of(cluster.events("echo"), message_id)[0]["t"] >= published + 2.5
    assert parked(cluster) == 0
