"""Behaviour only the kombu backend has: reconnecting after the broker connection drops, publish errors, and the
JSON-only wire. Runs on Redis and RabbitMQ; the connection is cut by a TCP proxy, never by touching the server."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Connection, Exchange, Producer

from nocluster import Application, PublishError
from nocluster.envelope import Envelope
from nocluster.pubsub.backends.kombu import KombuPubSubBackend
from tests.helpers import wait_until
from tests.pubsub.test_contract import Inbox
from tests.tcpproxy import TcpProxy

KOMBU = "nocluster.pubsub.backends.kombu.KombuPubSubBackend"


@pytest.fixture
def proxy(broker_url: str) -> Iterator[TcpProxy]:
    with TcpProxy.for_broker(broker_url) as tcp_proxy:
        yield tcp_proxy


@pytest.fixture
def kombu_app(app_name: str) -> Iterator[Callable[..., Application]]:
    built: list[Application] = []

    def make(url: str, **options: object) -> Application:
        node = Application({"NAME": app_name, "PUBSUB": {"BACKEND": KOMBU, "OPTIONS": {"url": url, **options}}})
        built.append(node)
        return node

    yield make
    for node in built:
        node.pub_sub_manager.stop()


def test_a_node_whose_connection_drops_reconnects_rebinds_and_resyncs(
    broker_url: str, proxy: TcpProxy, kombu_app: Callable[..., Application]
) -> None:
    # Given a publisher on the broker and a subscriber behind the proxy, with a news and a sync subscription
    publisher, subscriber = kombu_app(broker_url), kombu_app(proxy.url(broker_url))
    news = Inbox()
    resyncs: list[str] = []
    reconnects: list[int] = []
    subscriber.pub_sub_manager.subscribe("news", news)
    subscriber.sync_message_manager.subscribe("schema", print, resync=resyncs.append)
    subscriber.pub_sub_manager.on_reconnect(lambda: reconnects.append(1))
    for node in (publisher, subscriber):
        node.pub_sub_manager.start()
    publisher.pub_sub_manager.publish("news", "before")
    wait_until(lambda: news.items == ["before"], timeout=15)

    # When its broker connections are cut, and restored a moment later
    proxy.cut()
    publisher.pub_sub_manager.publish("news", "while cut")
    proxy.restore()

    # Then it reconnects by itself, re-binds, resyncs its sync subscribers, and gets what is published next
    wait_until(lambda: reconnects, timeout=20, message="the subscriber to reconnect")
    wait_until(lambda: resyncs == ["reconnect"], timeout=10, message="the resync")
    publisher.pub_sub_manager.publish("news", "after")
    wait_until(lambda: news.items[-1:] == ["after"], timeout=15)
    if broker_url.startswith("amqp"):
        # RabbitMQ kept the node's queue through the cut: nothing was lost
        assert news.items == ["before", "while cut", "after"]
    else:
        # Redis pub/sub is at most once: what went by during the cut is gone (hence the resync)
        assert news.items in (["before", "after"], ["before", "while cut", "after"])


def test_a_node_receives_again_soon_after_its_broker_is_back(
    broker_url: str, proxy: TcpProxy, kombu_app: Callable[..., Application], caplog: pytest.LogCaptureFixture
) -> None:
    # Given a subscriber behind the proxy whose broker stays unreachable until its retries have backed off fully
    publisher, subscriber = kombu_app(broker_url), kombu_app(proxy.url(broker_url))
    news = Inbox()
    subscriber.pub_sub_manager.subscribe("news", news)
    for node in (publisher, subscriber):
        node.pub_sub_manager.start()
    with caplog.at_level(logging.WARNING, logger="nocluster.pubsub"):
        proxy.cut()
        wait_until(
            lambda: sum("broker unreachable" in record.getMessage() for record in caplog.records) >= 6,
            timeout=60, interval=0.1, message="six failed reconnects",
        )  # fmt: skip

    # When the broker is reachable again, and messages are published every 50 ms from then on
    proxy.restore()
    back_at = time.monotonic()
    sent = 0

    def received_one() -> bool:
        nonlocal sent
        publisher.pub_sub_manager.publish("news", f"after {sent}")
        sent += 1
        return bool(news.items)

    # Then the node receives again within about a second (its longest retry wait is 1 s, reconnect_interval_max)
    wait_until(received_one, timeout=30, interval=0.05, message="a message after the restore")
    took = time.monotonic() - back_at
    print(f"{broker_url.split(':')[0]}: node receiving again {took:.2f} s after the broker was back")
    assert took < 4.0


def test_publishing_to_an_unreachable_broker_raises_publish_error_naming_the_channel(
    broker_url: str, kombu_app: Callable[..., Application]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    scheme = "redis://127.0.0.1:{}/0" if broker_url.startswith("redis") else "amqp://guest:guest@127.0.0.1:{}//"
    node = kombu_app(scheme.format(closed_port), publish_retries=0)

    with pytest.raises(PublishError, match=r"'.*\.orders'"):
        node.pub_sub_manager.publish("orders", {"id": 1})


def wire_exchange(node: Application, full_channel: str) -> Exchange:
    """The exchange of ``full_channel`` as the node declares it (durable on RabbitMQ unless configured otherwise)."""
    backend = node.pub_sub_manager.backend
    assert isinstance(backend, KombuPubSubBackend)
    return backend.exchange(full_channel)


def test_a_non_json_message_on_the_wire_is_dropped_and_consuming_goes_on(
    broker_url: str, kombu_app: Callable[..., Application], caplog: pytest.LogCaptureFixture
) -> None:
    node = kombu_app(broker_url)
    inbox = Inbox()
    node.pub_sub_manager.subscribe("wire", inbox)
    node.pub_sub_manager.start()
    full = node.pub_sub_manager.full_channel("wire")

    # When someone publishes a pickled body on the channel's exchange, then a proper message follows
    with caplog.at_level(logging.ERROR, logger="nocluster.pubsub"), Connection(broker_url) as conn:
        exchange = wire_exchange(node, full)
        Producer(conn).publish({"x": 1}, exchange=exchange, routing_key="", serializer="pickle", declare=[exchange])
        other = kombu_app(broker_url)
        other.pub_sub_manager.publish("wire", "json")
        wait_until(lambda: inbox.items == ["json"], timeout=15)

    # Then the pickle was refused (never unpickled) and logged
    assert any("undecodable" in record.getMessage() for record in caplog.records)


def test_malformed_envelopes_on_the_wire_are_logged_once_each_and_the_consumer_keeps_running(
    broker_url: str, kombu_app: Callable[..., Application], caplog: pytest.LogCaptureFixture
) -> None:
    # Given a node consuming a plain and a debounced subscription over a real broker
    node = kombu_app(broker_url)
    plain, debounced = Inbox(), Inbox()
    node.pub_sub_manager.subscribe("wire", plain)
    node.pub_sub_manager.subscribe("wire", debounced, debounce=0.05)
    node.pub_sub_manager.start()
    full = node.pub_sub_manager.full_channel("wire")
    valid = Envelope(publisher_id="someone", message="m").to_wire()
    bad_bodies = [
        json.dumps({**valid, "id": [1]}),  # a field of the wrong type
        json.dumps({**valid, "message": {"x": float("nan")}}),  # NaN: Python's json writes and reads it
        json.dumps({**valid, "message": "\ud800"}),  # a lone surrogate: json.dumps writes it as the text \\ud800
        json.dumps([1, 2, 3]),  # not an object
    ]

    # When they are published raw on the channel's exchange, then a proper message follows
    with caplog.at_level(logging.INFO, logger="nocluster.pubsub"), Connection(broker_url) as conn:
        exchange = wire_exchange(node, full)
        producer = Producer(conn)
        for body in bad_bodies:
            producer.publish(
                body, exchange=exchange, routing_key="", content_type="application/json",
                content_encoding="utf-8", declare=[exchange],
            )  # fmt: skip
        kombu_app(broker_url).pub_sub_manager.publish("wire", "after")
        wait_until(lambda: plain.items == ["after"] and debounced.items == ["after"], timeout=15)

    # Then each bad one was logged once and dropped, and the consumer never restarted or reconnected
    messages = [record.getMessage() for record in caplog.records]
    assert len([m for m in messages if "malformed envelope" in m]) == len(bad_bodies), messages
    assert not [m for m in messages if "restarting" in m or "reconnect" in m], messages


def test_a_publisher_whose_connection_dropped_publishes_again_after_it_is_back(
    broker_url: str, proxy: TcpProxy, kombu_app: Callable[..., Application]
) -> None:
    publisher, subscriber = kombu_app(proxy.url(broker_url)), kombu_app(broker_url)
    inbox = Inbox()
    subscriber.pub_sub_manager.subscribe("orders", inbox)
    subscriber.pub_sub_manager.start()
    publisher.pub_sub_manager.publish("orders", 1)

    # When the publisher's connection is cut and the broker is reachable again
    proxy.cut()
    proxy.restore()

    # Then the next publish reconnects by itself and goes through
    publisher.pub_sub_manager.publish("orders", 2)
    wait_until(lambda: inbox.items == [1, 2], timeout=15)


def read_line(stream: Any, timeout: float = 20.0) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"nothing from the child within {timeout} s"
    return stream.readline().strip()


def test_a_forked_child_starts_its_own_consumer_with_the_parent_subscriptions(
    broker_url: str, kombu_app: Callable[..., Application]
) -> None:
    # Given a parent that loaded its subscriptions but started nothing (as gunicorn --preload, Celery prefork)
    parent, publisher = kombu_app(broker_url), kombu_app(broker_url)
    read_end, write_end = os.pipe()
    parent.pub_sub_manager.subscribe("forked", lambda message: os.write(write_end, f"{message}\n".encode()))

    pid = os.fork()
    if pid == 0:  # the child: a new instance that starts its own consumer
        code = 1
        try:
            parent._after_fork_in_child()
            parent.pub_sub_manager.start()
            os.write(write_end, f"ready {parent.instance_id}\n".encode())
            time.sleep(15)  # the parent kills us once it has read the message
        finally:
            os._exit(code)

    # Then the child has its own instance id, and gets what is published afterwards
    try:
        lines = os.fdopen(read_end, "r")
        ready = read_line(lines).split()
        assert ready[0] == "ready" and ready[1] != parent.instance_id
        publisher.pub_sub_manager.publish("forked", "to the child")
        assert read_line(lines) == "to the child"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(write_end)


def test_unsubscribing_while_the_channel_is_busy_keeps_the_connection_and_other_channels(
    broker_url: str, kombu_app: Callable[..., Application]
) -> None:
    # Given a subscriber of a busy channel and of a quiet one
    publisher, subscriber = kombu_app(broker_url), kombu_app(broker_url)
    busy, quiet = Inbox(), Inbox()
    reconnects: list[int] = []

    def slow_busy(message: Any) -> None:  # the subscriber lags, so messages of the channel wait in its socket
        time.sleep(0.002)
        busy(message)

    subscriber.pub_sub_manager.subscribe("busy", slow_busy)
    subscriber.pub_sub_manager.subscribe("quiet", quiet)
    subscriber.pub_sub_manager.on_reconnect(lambda: reconnects.append(1))
    for node in (publisher, subscriber):
        node.pub_sub_manager.start()
    publisher.pub_sub_manager.publish("busy", -1)
    wait_until(lambda: busy.items == [-1], timeout=15)

    # When it unsubscribes the busy channel while a burst of it is on the way
    stop = threading.Event()
    published = [0]

    def burst() -> None:
        while not stop.is_set() and published[0] < 20000:
            publisher.pub_sub_manager.publish("busy", published[0])
            published[0] += 1

    flood = threading.Thread(target=burst)
    flood.start()
    wait_until(lambda: len(busy.items) > 200, timeout=15, message="the burst to arrive")
    subscriber.pub_sub_manager.unsubscribe("busy", slow_busy)
    # The burst goes on after the unsubscribe: another 500 messages of it are handed to the broker
    after_unsubscribe = published[0]
    wait_until(lambda: published[0] >= min(after_unsubscribe + 500, 20000), timeout=15, message="the burst to go on")
    stop.set()
    flood.join(15)
    for n in range(20):
        publisher.pub_sub_manager.publish("quiet", n)

    # Then its connection was not dropped and the other channel lost nothing
    wait_until(lambda: quiet.items == list(range(20)), timeout=15, message="every quiet message")
    assert reconnects == []


@pytest.mark.parametrize("existing_durable", [False, True])
def test_an_exchange_declared_with_the_other_durability_is_used_as_it_is(
    amqp_url: str, kombu_app: Callable[..., Application], caplog: pytest.LogCaptureFixture, existing_durable: bool
) -> None:
    # Given the channel's exchange exists with the other durability (made by an earlier nocluster, which declared
    # them non-durable, or by nodes with OPTIONS durable set otherwise)
    probe = kombu_app(amqp_url)
    full = probe.pub_sub_manager.full_channel("legacy")
    with Connection(amqp_url) as conn:
        Exchange(full, type="fanout", durable=existing_durable)(conn.default_channel).declare()
    try:
        # When nodes of the other setting subscribe and publish on it (RabbitMQ answers PRECONDITION_FAILED)
        with caplog.at_level(logging.WARNING, logger="nocluster.pubsub"):
            subscriber = kombu_app(amqp_url, durable=not existing_durable)
            inbox = Inbox()
            subscriber.pub_sub_manager.subscribe("legacy", inbox)
            subscriber.pub_sub_manager.start()
            publisher = kombu_app(amqp_url, durable=not existing_durable)
            publisher.pub_sub_manager.publish("legacy", "one")
            publisher.pub_sub_manager.publish("legacy", "two")
            # Then they use it as it is: messages flow, and the mismatch is named in a warning
            wait_until(lambda: inbox.items == ["one", "two"], timeout=15)
        warnings = [r.getMessage() for r in caplog.records if "exists with other settings" in r.getMessage()]
        assert warnings and all(repr(full) in message for message in warnings)
        assert subscriber.pub_sub_manager.backend.connected
    finally:
        with Connection(amqp_url) as conn:
            conn.default_channel.exchange_delete(full)
