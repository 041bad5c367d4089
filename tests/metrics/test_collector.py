"""The gauges read at scrape time (``ClusterCollector``, ``EventQueue.channel_stats``) and the recorders of pub/sub
and sync, in this process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection
from prometheus_client import CollectorRegistry, generate_latest

from nocluster import Application, UnknownChannel
from nocluster.metrics.collector import ClusterCollector
from nocluster.metrics.families import Families, families
from nocluster.metrics.recorders import PrometheusPubSubMetrics, PrometheusSyncMetrics
from nocluster.queue.backends.celery import celery_queue
from nocluster.queue.stats import ChannelStats
from nocluster.testing import drain
from tests.helpers import free_port
from tests.metrics.scrape import parse, value
from tests.queue.conftest import CELERY_BACKEND, delete_keys

MEMORY = {"BACKEND": "nocluster.queue.backends.memory.MemoryQueueBackend", "OPTIONS": {}}


def scraped(collector: ClusterCollector) -> dict[Any, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return parse(generate_latest(registry).decode())


@pytest.mark.django_db(transaction=True)  # published outside a transaction: straight to the queue, not the outbox
def test_collector_reads_depth_age_consumers_outbox_and_nodes_on_the_memory_backend(app_name: str) -> None:
    # Given 3 messages waiting on a channel of the memory queue (not started: nothing consumes them)
    app = Application({"NAME": app_name, "EVENT_QUEUE": MEMORY})
    app.event_queue.subscribe("jobs", lambda payload, context: None)
    app.event_queue.subscribe("idle", lambda payload, context: None)
    first = time.time()
    app.event_queue.publish_many("jobs", [1, 2, 3])
    nodes = [{"role": "web", "state": "up"}, {"role": "web", "state": "up"}, {"role": "worker", "state": "gone"},
             {"role": "worker", "state": "up"}]  # fmt: skip

    # When it is scraped
    found = scraped(ClusterCollector(app.event_queue, app.outbox, lambda: nodes))

    # Then each channel shows its depth, the oldest message's age and the consumer threads (none: not started)
    assert app.event_queue.channel_stats("jobs").depth == 3
    assert value(found, "nocluster_queue_depth", channel="jobs") == 3
    assert 0 <= value(found, "nocluster_queue_oldest_age_seconds", channel="jobs") <= time.time() - first
    assert value(found, "nocluster_queue_consumers", channel="jobs") == 0
    assert value(found, "nocluster_queue_depth", channel="idle") == 0
    assert ("nocluster_queue_oldest_age_seconds", frozenset({("channel", "idle")})) not in found
    # ... the outbox backlog, and the nodes up by role (a gone one is not up)
    assert value(found, "nocluster_outbox_backlog") == 0
    assert value(found, "nocluster_nodes_up", role="web") == 2
    assert value(found, "nocluster_nodes_up", role="worker") == 1
    with pytest.raises(UnknownChannel):
        app.event_queue.channel_stats("nobody")


@pytest.mark.django_db
def test_a_part_that_fails_is_left_out_and_the_rest_is_served(app_name: str) -> None:
    app = Application({"NAME": app_name, "EVENT_QUEUE": MEMORY})
    app.event_queue.subscribe("jobs", lambda payload, context: None)

    def registry_down() -> list[dict[str, Any]]:
        raise ConnectionError("database down")

    found = scraped(ClusterCollector(app.event_queue, app.outbox, registry_down))
    assert value(found, "nocluster_queue_depth", channel="jobs") == 0
    assert not [name for name, _ in found if name == "nocluster_nodes_up"]


@pytest.fixture(params=["redis", "amqp"])
def celery_app(request: pytest.FixtureRequest, app_name: str) -> Iterator[Application]:
    """An Application publishing on Celery (no worker consumes), its queue and keys deleted afterwards."""
    url = request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url")
    app = Application({"NAME": app_name, "EVENT_QUEUE": {"BACKEND": CELERY_BACKEND, "OPTIONS": {"broker_url": url}}})
    app.event_queue.subscribe("jobs", lambda payload, context: None)
    yield app
    app.event_queue.stop()
    with Connection(url) as connection:
        celery_queue(app.event_queue.full_channel("jobs"))(connection.default_channel).delete()
    delete_keys(app_name)


def test_channel_stats_of_the_celery_backend(celery_app: Application) -> None:
    queue = celery_app.event_queue
    redis = queue.backend.broker_url.startswith("redis")
    # Given a queue never declared: nothing waits (RabbitMQ also says no one consumes)
    assert queue.channel_stats("jobs") == ChannelStats(0, None, None if redis else 0)
    # When 2 messages are published and none consumed
    before = time.time()
    queue.publish("jobs", {"n": 1})
    queue.publish("jobs", {"n": 2})
    stats = queue.channel_stats("jobs")
    # Then both wait; Redis tells the oldest one's age (RabbitMQ cannot without taking it), RabbitMQ the consumers
    assert stats.depth == 2
    if redis:
        assert stats.oldest_age is not None and 0 <= stats.oldest_age <= time.time() - before
        assert stats.consumers is None
    else:
        assert stats.oldest_age is None and stats.consumers == 0


def test_every_channel_s_stats_are_read_over_one_broker_connection(celery_app: Application) -> None:
    # Given three channels, two with messages waiting
    queue = celery_app.event_queue
    redis = queue.backend.broker_url.startswith("redis")
    for channel in ("mail", "export"):
        queue.subscribe(channel, lambda payload, context: None)
    queue.publish_many("jobs", [1, 2, 3])
    queue.publish("mail", {"to": "a"})
    broker_app = queue.backend.celery_app
    opened = []
    connection_for_read = broker_app.connection_for_read

    def counted(*args: Any, **kwargs: Any) -> Any:
        opened.append(1)
        return connection_for_read(*args, **kwargs)

    broker_app.connection_for_read = counted
    try:
        # When a scrape reads them all
        stats = queue.all_channel_stats()
    finally:
        del broker_app.connection_for_read

    # Then each has its own figures, and they came over one connection (a scrape no longer opens one per channel)
    assert {channel: row.depth for channel, row in stats.items()} == {"jobs": 3, "mail": 1, "export": 0}
    assert stats["export"] == ChannelStats(0, None, None if redis else 0)
    assert len(opened) == 1
    with Connection(queue.backend.broker_url) as connection:
        for channel in ("mail", "export"):
            celery_queue(queue.full_channel(channel))(connection.default_channel).delete()


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_channel_stats_fail_at_once_when_the_broker_is_unreachable(scheme: str, app_name: str) -> None:
    # Given a Celery backend whose broker port has no server (connections are refused)
    url = (
        f"{scheme}://127.0.0.1:{free_port()}/0"
        if scheme == "redis"
        else f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    )
    app = Application({"NAME": app_name, "EVENT_QUEUE": {"BACKEND": CELERY_BACKEND, "OPTIONS": {"broker_url": url}}})
    app.event_queue.subscribe("jobs", lambda payload, context: None)

    # When a scrape (or the Cluster page) asks for a channel's figures, the error comes after one quick retry,
    # not after kombu's default retries (about 6 s for each channel: a page of five channels would take 30 s)
    started = time.monotonic()
    with pytest.raises(Exception, match=r"(?i)refused|connect"):
        app.event_queue.channel_stats("jobs")
    assert time.monotonic() - started < 3


@pytest.fixture
def fresh_families(request: pytest.FixtureRequest) -> Families:
    """The metrics, made anew with this process's in-memory values (not the multiprocess files)."""
    families.cache_clear()
    request.addfinalizer(families.cache_clear)
    return families()


@pytest.mark.django_db(transaction=True)  # sync messages go out on commit
def test_pubsub_and_sync_recorders_count_per_channel_and_node(app_name: str, fresh_families: Families) -> None:
    # Given two nodes of one project on the in-process bus, recording metrics
    nodes = []
    for _ in range(2):
        node = Application({"NAME": app_name, "PUBSUB": {"BACKEND": "nocluster.pubsub.backends.local."
                            "LocalPubSubBackend", "OPTIONS": {"bus": app_name}}, "SYNC": {"DEBOUNCE": 0}})  # fmt: skip
        node.metrics.pubsub = PrometheusPubSubMetrics(fresh_families, node.identity)
        node.metrics.sync = PrometheusSyncMetrics(fresh_families)
        node.pub_sub_manager.start()
        nodes.append(node)
    sender, receiver = nodes
    resyncs: list[str] = []
    receiver.pub_sub_manager.subscribe("news", lambda message: None)
    receiver.sync_message_manager.subscribe("schema", lambda message: None, debounce=0, resync=resyncs.append)
    try:
        # When the sender publishes 3 messages, and 3 sync messages of which the receiver misses the second
        for n in range(3):
            sender.pub_sub_manager.publish("news", n)
        sender.sync_message_manager.publish("schema", "first")
        drain(sender, receiver)
        full = receiver.pub_sub_manager.full_channel("sync.schema")
        receiver.pub_sub_manager.backend.unsubscribe(full)
        sender.sync_message_manager.publish("schema", "missed")
        drain(sender, receiver)
        receiver.pub_sub_manager.backend.subscribe(full)
        sender.sync_message_manager.publish("schema", "third")
        drain(sender, receiver)
        # ... and a malformed envelope reaches the receiver
        receiver.pub_sub_manager.deliver(receiver.pub_sub_manager.full_channel("news"), {"bogus": True})
    finally:
        for node in nodes:
            node.pub_sub_manager.stop()

    # Then each node's counts carry its label, and the gap made one resync
    sent, got = sender.identity.short_id, receiver.identity.short_id
    counts = fresh_families
    assert counts.pubsub_published.labels("news", sent)._value.get() == 3
    assert counts.pubsub_received.labels("news", got)._value.get() == 3
    assert counts.pubsub_received.labels("news", sent)._value.get() == 0  # skip_self
    assert counts.pubsub_dropped_malformed.labels("news", got)._value.get() == 1
    assert counts.sync_gaps.labels("schema")._value.get() == 1
    assert counts.sync_resyncs.labels("schema", "gap")._value.get() == 1
    assert resyncs == ["gap"]


@pytest.mark.django_db(transaction=True)
def test_channel_stats_of_the_database_backend(app_name: str) -> None:
    # Given 2 rows waiting in the embedded queue's table (not started: nothing takes them)
    database = {"BACKEND": "nocluster.queue.backends.database.DatabaseQueueBackend", "OPTIONS": {}}
    app = Application({"NAME": app_name, "EVENT_QUEUE": database})
    app.event_queue.subscribe("jobs", lambda payload, context: None)
    assert app.event_queue.channel_stats("jobs") == ChannelStats(0, None, None)
    before = time.time()
    app.event_queue.publish_many("jobs", [1, 2])
    stats = app.event_queue.channel_stats("jobs")
    # Then both wait, the oldest since its row was written; consumers are unknown (any process may take them)
    assert stats.depth == 2
    assert stats.oldest_age is not None and 0 <= stats.oldest_age <= time.time() - before + 0.01
    assert stats.consumers is None
