"""The pub/sub contract, run in-process on every backend: local, kombu over Redis, kombu over RabbitMQ.

Three Applications of this process play three nodes (each has its own ``instance_id`` and consumer). The same
behaviour with real node processes is in ``test_nodes.py``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

from nocluster import Application, InvalidChannel
from tests.helpers import wait_until


class Inbox:
    """A thread-safe recording callback."""

    def __init__(self, fail_on: Any = None) -> None:
        self.items: list[Any] = []
        self.threads: set[str] = set()
        self.fail_on = fail_on
        self._lock = threading.Lock()

    def __call__(self, message: Any) -> None:
        with self._lock:
            self.items.append(message)
            self.threads.add(threading.current_thread().name)
        if self.fail_on is not None and message == self.fail_on:
            raise RuntimeError("this callback fails on purpose")

    def __len__(self) -> int:
        with self._lock:
            return len(self.items)


def subscribe_all(nodes: list[Application], channel: str, **kwargs: Any) -> list[Inbox]:
    inboxes = [Inbox() for _ in nodes]
    for node, inbox in zip(nodes, inboxes, strict=True):
        node.pub_sub_manager.subscribe(channel, inbox, **kwargs)
    return inboxes


def barrier(nodes: list[Application], sender: Application) -> None:
    """Publish a marker on a second channel and wait until every other node got it: everything the sender
    published before it has been delivered by then (one publisher's messages arrive in order)."""
    inboxes = subscribe_all(nodes, "barrier")
    sender.pub_sub_manager.publish("barrier", "mark")
    for node, inbox in zip(nodes, inboxes, strict=True):
        if node is not sender:
            wait_until(lambda inbox=inbox: len(inbox) >= 1, timeout=15, message="the barrier marker")


def test_skip_self_reaches_the_others_and_not_the_publisher(cluster: list[Application]) -> None:
    # Given three nodes subscribed to "news"
    inboxes = subscribe_all(cluster, "news")

    # When node 0 publishes (skip_self is the default)
    message_id = cluster[0].pub_sub_manager.publish("news", {"hello": "world", "n": [1, 2.5, None, True]})

    # Then nodes 1 and 2 get the message as sent, in their consumer thread, and node 0 does not
    wait_until(lambda: len(inboxes[1]) == 1 and len(inboxes[2]) == 1, timeout=15)
    barrier(cluster, cluster[0])
    assert isinstance(message_id, str) and len(message_id) == 32
    assert inboxes[1].items == inboxes[2].items == [{"hello": "world", "n": [1, 2.5, None, True]}]
    assert inboxes[0].items == []
    assert all(name.startswith("nocluster-pubsub") for name in inboxes[1].threads)


def test_without_skip_self_the_publisher_gets_it_too(cluster: list[Application]) -> None:
    inboxes = subscribe_all(cluster, "all")
    cluster[0].pub_sub_manager.publish("all", "x", skip_self=False)
    wait_until(lambda: all(len(inbox) == 1 for inbox in inboxes), timeout=15)


def test_only_self_reaches_the_publisher_alone(cluster: list[Application]) -> None:
    inboxes = subscribe_all(cluster, "mine")

    cluster[0].pub_sub_manager.publish("mine", "just me", only_self=True)

    # only_self needs no broker: the publisher's callbacks ran before publish() returned
    assert inboxes[0].items == ["just me"]
    barrier(cluster, cluster[0])
    assert inboxes[1].items == [] and inboxes[2].items == []


def test_debounce_coalesces_equal_messages_and_keeps_different_ones_apart(cluster: list[Application]) -> None:
    # Given nodes subscribed with a 0.3 s debounce
    inboxes = subscribe_all(cluster, "reload", debounce=0.3)

    # When 50 equal messages and 50 of another content are published in one burst
    for _ in range(50):
        cluster[0].pub_sub_manager.publish("reload", {"what": "users"})
        cluster[0].pub_sub_manager.publish("reload", {"what": "roles"})

    # Then each other node makes one call per distinct content
    for inbox in inboxes[1:]:
        wait_until(lambda inbox=inbox: len(inbox) == 2, timeout=15)
    barrier(cluster, cluster[0])
    wait_until(lambda: all(node.pub_sub_manager.debouncer.idle() for node in cluster), timeout=5)
    for inbox in inboxes[1:]:
        assert sorted(item["what"] for item in inbox.items) == ["roles", "users"]
    assert inboxes[0].items == []


def test_unsubscribe_stops_delivery(cluster: list[Application]) -> None:
    inboxes = subscribe_all(cluster, "topic")
    cluster[0].pub_sub_manager.publish("topic", 1)
    wait_until(lambda: len(inboxes[1]) == 1, timeout=15)

    # When node 1 unsubscribes and node 0 publishes again
    cluster[1].pub_sub_manager.unsubscribe("topic", inboxes[1])
    cluster[0].pub_sub_manager.publish("topic", 2)

    # Then node 2 gets it, node 1 does not (the barrier proves the message went by)
    wait_until(lambda: len(inboxes[2]) == 2, timeout=15)
    barrier(cluster, cluster[0])
    assert inboxes[1].items == [1]


def test_messages_from_one_publisher_arrive_in_order(cluster: list[Application]) -> None:
    inboxes = subscribe_all(cluster, "ordered")
    for n in range(300):
        cluster[0].pub_sub_manager.publish("ordered", n)
    for inbox in inboxes[1:]:
        wait_until(lambda inbox=inbox: len(inbox) == 300, timeout=30)
        assert inbox.items == list(range(300))


def test_a_raising_callback_is_logged_and_later_messages_still_arrive(
    cluster: list[Application], caplog: pytest.LogCaptureFixture
) -> None:
    # Given node 1's callback raises on the message "boom"
    failing = Inbox(fail_on="boom")
    cluster[1].pub_sub_manager.subscribe("fragile", failing)

    # When "boom" then "fine" are published
    with caplog.at_level(logging.ERROR, logger="nocluster.pubsub"):
        boom_id = cluster[0].pub_sub_manager.publish("fragile", "boom")
        cluster[0].pub_sub_manager.publish("fragile", "fine")
        wait_until(lambda: len(failing) == 2, timeout=15)

    # Then both were delivered, and the failure was logged with channel, message id and instance id
    assert failing.items == ["boom", "fine"]
    records = [r for r in caplog.records if "raised on channel" in r.getMessage()]
    assert len(records) == 1
    text = records[0].getMessage()
    assert "'fragile'" in text and boom_id in text and cluster[1].instance_id in text
    assert records[0].exc_info is not None


def test_subscribing_the_same_callback_twice_keeps_one_subscription(cluster: list[Application]) -> None:
    inbox = Inbox()
    cluster[1].pub_sub_manager.subscribe("twice", inbox)
    cluster[1].pub_sub_manager.subscribe("twice", inbox)
    cluster[0].pub_sub_manager.publish("twice", "once")
    wait_until(lambda: len(inbox) >= 1, timeout=15)
    barrier(cluster, cluster[0])
    assert inbox.items == ["once"]


def test_a_subscription_made_before_start_is_bound_when_the_node_starts(
    cluster: list[Application], make_app: Callable[..., Application]
) -> None:
    # Given a fourth node that subscribes before its consumer starts
    late = make_app()
    inbox = Inbox()
    late.pub_sub_manager.subscribe("early", inbox)

    # When it starts and node 0 publishes
    late.pub_sub_manager.start()
    cluster[0].pub_sub_manager.publish("early", "bound")

    # Then it receives the message
    wait_until(lambda: inbox.items == ["bound"], timeout=15)


def test_a_subscription_made_after_start_receives_at_once(cluster: list[Application]) -> None:
    inbox = Inbox()
    cluster[2].pub_sub_manager.subscribe("later", inbox)
    cluster[0].pub_sub_manager.publish("later", "right away")
    wait_until(lambda: inbox.items == ["right away"], timeout=15)


def test_non_json_payloads_and_bad_channel_names_are_refused(cluster: list[Application]) -> None:
    pubsub = cluster[0].pub_sub_manager
    with pytest.raises(TypeError, match=r"channel 'orders'.*set"):
        pubsub.publish("orders", {"ids": {1, 2}})
    with pytest.raises(TypeError, match=r"channel 'orders'.*object"):
        pubsub.publish("orders", object())
    with pytest.raises(InvalidChannel, match="non-empty"):
        pubsub.publish("", "x")
    with pytest.raises(InvalidChannel, match=r"'bad channel'"):
        pubsub.subscribe("bad channel", print)
    with pytest.raises(InvalidChannel):
        pubsub.publish("trailing.", "x")


def test_publishing_from_many_threads_at_once_is_safe(cluster: list[Application]) -> None:
    # Given 8 request threads of node 0 publishing 50 messages each at the same time
    inbox = Inbox()
    cluster[1].pub_sub_manager.subscribe("busy", inbox)
    errors: list[BaseException] = []

    def publish_many(thread: int) -> None:
        try:
            for n in range(50):
                cluster[0].pub_sub_manager.publish("busy", [thread, n])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish_many, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    # Then every message arrives once, and each thread's messages in its order
    wait_until(lambda: len(inbox) == 400, timeout=30)
    assert errors == []
    for t in range(8):
        assert [n for thread, n in inbox.items if thread == t] == list(range(50))
