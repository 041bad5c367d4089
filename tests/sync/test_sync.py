"""Sync messages: gated by the commit, debounced, numbered per channel, and resynced after a gap or a reconnect."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import transaction

from nocluster import Application, InvalidChannel, Plugin
from nocluster.models import InstalledPlugin
from nocluster.sync.sequence import GapDetector, is_resync
from nocluster.testing import drain, wait_until
from tests.pubsub.test_contract import Inbox


def write_something(name: str) -> None:
    """A real write in the current transaction, so commit and rollback mean something."""
    InstalledPlugin.objects.create(name=name)


def test_a_rolled_back_transaction_sends_nothing(
    committing_postgres: None, make_node: Callable[[], Application]
) -> None:
    sender, receiver = make_node(), make_node()
    inbox = Inbox()
    receiver.sync_message_manager.subscribe("users", inbox)

    # When a sync message is published inside an atomic block that then fails
    with pytest.raises(RuntimeError), transaction.atomic():
        write_something("rolled-back")
        sender.sync_message_manager.publish("users", {"changed": 1})
        raise RuntimeError("roll back")

    # Then nothing was sent (the next committed message is the first to arrive)
    sender.sync_message_manager.publish("users", {"changed": 2})
    drain(sender, receiver)
    assert inbox.items == [{"changed": 2}]
    assert not InstalledPlugin.objects.filter(name="rolled-back").exists()


def test_a_committed_transaction_sends_after_the_commit(
    committing_postgres: None, make_node: Callable[[], Application]
) -> None:
    sender, receiver = make_node(), make_node()
    inbox = Inbox()
    receiver.sync_message_manager.subscribe("users", inbox)

    with transaction.atomic():
        write_something("committed")
        sender.sync_message_manager.publish("users", {"changed": 1})
        # Inside the block nothing has gone out yet
        drain(sender, receiver)
        assert inbox.items == []

    # After the commit it is delivered
    drain(sender, receiver)
    assert inbox.items == [{"changed": 1}]


def test_outside_a_transaction_it_is_sent_at_once_and_never_to_the_sender(
    committing_postgres: None, make_node: Callable[[], Application]
) -> None:
    sender, receiver = make_node(), make_node()
    mine, theirs = Inbox(), Inbox()
    sender.sync_message_manager.subscribe("users", mine)
    receiver.sync_message_manager.subscribe("users", theirs)

    sender.sync_message_manager.publish("users", "reload")

    drain(sender, receiver)
    assert theirs.items == ["reload"] and mine.items == []


def test_an_inner_savepoint_rollback_drops_only_its_own_messages(
    committing_postgres: None, make_node: Callable[[], Application]
) -> None:
    sender, receiver = make_node(), make_node()
    inbox = Inbox()
    receiver.sync_message_manager.subscribe("users", inbox)

    with transaction.atomic():
        sender.sync_message_manager.publish("users", "outer")
        with pytest.raises(RuntimeError), transaction.atomic():
            sender.sync_message_manager.publish("users", "inner")
            raise RuntimeError("roll back the savepoint")

    drain(sender, receiver)
    assert inbox.items == ["outer"]


def test_a_failing_on_commit_callback_does_not_stop_the_sync_message(
    committing_postgres: None, make_node: Callable[[], Application]
) -> None:
    sender, receiver = make_node(), make_node()
    inbox = Inbox()
    receiver.sync_message_manager.subscribe("users", inbox)

    def broken() -> None:
        raise RuntimeError("another on_commit callback fails")

    with transaction.atomic():
        transaction.on_commit(broken, robust=True)
        sender.sync_message_manager.publish("users", "still sent")

    drain(sender, receiver)
    assert inbox.items == ["still sent"]


def test_bad_messages_and_channels_are_refused_when_published(
    committing_postgres: None, make_node: Callable[[], Application]
) -> None:
    sender = make_node()
    with pytest.raises(TypeError, match=r"channel 'sync\.users'"):
        sender.sync_message_manager.publish("users", {"when": object()})
    with pytest.raises(InvalidChannel):
        sender.sync_message_manager.publish("", "x")


def test_sync_messages_are_debounced_by_default(
    committing_postgres: None, make_node: Callable[[], Application]
) -> None:
    # Given the setting NOCLUSTER["SYNC"]["DEBOUNCE"] = 0.2 s
    sender, receiver = make_node(), make_node()
    inbox = Inbox()
    receiver.sync_message_manager.subscribe("roles", inbox)
    assert receiver.sync_message_manager.debounce == 0.2

    # When 50 equal and 50 other messages arrive in a burst
    for _ in range(50):
        sender.sync_message_manager.publish("roles", {"reload": "roles"})
        sender.sync_message_manager.publish("roles", {"reload": "acl"})

    # Then one call per content
    drain(sender, receiver)
    assert sorted(item["reload"] for item in inbox.items) == ["acl", "roles"]


def test_a_gap_in_sequence_numbers_makes_the_receiver_resync(
    committing_postgres: None, make_node: Callable[[], Application]
) -> None:
    sender, receiver = make_node(), make_node()
    inbox = Inbox()
    resyncs: list[str] = []
    receiver.sync_message_manager.subscribe("schema", inbox, debounce=0, resync=resyncs.append)
    sender.sync_message_manager.publish("schema", "first")
    drain(sender, receiver)

    # When the receiver misses a message (its binding is gone while it is published, as when a broker drops it)
    full = receiver.pub_sub_manager.full_channel("sync.schema")
    receiver.pub_sub_manager.backend.unsubscribe(full)
    sender.sync_message_manager.publish("schema", "missed")
    drain(sender, receiver)
    receiver.pub_sub_manager.backend.subscribe(full)
    sender.sync_message_manager.publish("schema", "third")
    drain(sender, receiver)

    # Then it resynced once, besides getting the messages it did see
    assert inbox.items == ["first", "third"]
    assert resyncs == ["gap"]


def test_a_reconnect_makes_every_sync_subscriber_resync(make_node: Callable[[], Application]) -> None:
    node = make_node()
    resyncs: list[str] = []
    markers = Inbox()
    node.sync_message_manager.subscribe("a", print, resync=resyncs.append)
    node.sync_message_manager.subscribe("b", markers)  # no resync hook: gets the marker

    # The backend reports a reconnect (kombu does so from on_connection_revived; see tests/pubsub/test_kombu.py)
    node.pub_sub_manager.connection_revived(True)

    drain(node)
    assert resyncs == ["reconnect"]
    assert len(markers.items) == 1 and is_resync(markers.items[0]) and markers.items[0]["reason"] == "reconnect"


def test_plugins_get_their_own_channel_and_a_default_resync(
    committing_postgres: None, make_node: Callable[[], Application]
) -> None:
    class Recorder(Plugin):
        def __init__(self, app: Application, label: str) -> None:
            super().__init__(app, type("Config", (), {"label": label})())
            self.messages: list[Any] = []

        def handle_sync_message(self, message: Any) -> None:
            self.messages.append(message)

    sender, receiver = make_node(), make_node()
    here, there = Recorder(sender, "recorder"), Recorder(receiver, "recorder")
    other = Recorder(receiver, "other")
    for plugin in (here, there, other):
        plugin.app.sync_message_manager.register_plugin(plugin)

    here.send_sync_message({"changed": "x"})
    drain(sender, receiver)
    assert there.messages == [{"changed": "x"}]
    assert here.messages == [] and other.messages == []

    # The default resync() hands handle_sync_message the resync marker
    receiver.pub_sub_manager.connection_revived(True)
    drain(receiver)
    assert is_resync(there.messages[-1]) and is_resync(other.messages[-1])


def test_gap_detector_counts_missed_numbers_per_publisher() -> None:
    gaps = GapDetector()
    assert gaps.observe("c", "a", 5) == 0  # first seen: baseline
    assert gaps.observe("c", "a", 6) == 0
    assert gaps.observe("c", "a", 9) == 2
    assert gaps.observe("c", "b", 1) == 0
    assert gaps.observe("c", "a", 9) == 0  # duplicate
    gaps.reset()
    assert gaps.observe("c", "a", 20) == 0


def test_many_threads_publishing_on_one_node_cause_no_false_gap(
    committing_postgres: None, make_node: Callable[[], Application]
) -> None:
    # Given a receiver, and a sender whose request threads publish on one channel at the same time
    sender, receiver = make_node(), make_node()
    inbox = Inbox()
    resyncs: list[str] = []
    receiver.sync_message_manager.subscribe("schema", inbox, debounce=0, resync=resyncs.append)

    def publish_many(thread: int) -> None:
        from django.db import connection

        try:
            for n in range(100):
                sender.sync_message_manager.publish("schema", [thread, n])
        finally:
            connection.close()  # as Django does when a request ends

    threads = [threading.Thread(target=publish_many, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    drain(sender, receiver)

    # Then every message arrived and none looked missed
    assert len(inbox.items) == 800
    assert resyncs == []


def test_a_pending_debounced_call_does_not_run_after_unsubscribe(
    committing_postgres: None, make_node: Callable[[], Application]
) -> None:
    sender, receiver = make_node(), make_node()
    inbox = Inbox()
    receiver.sync_message_manager.subscribe("schema", inbox, debounce=0.5)
    sender.sync_message_manager.publish("schema", "x")
    # Delivered: the call is now pending in the debouncer
    wait_until(lambda: not receiver.pub_sub_manager.debouncer.idle(), timeout=5)
    receiver.sync_message_manager.unsubscribe("schema", inbox)
    drain(sender, receiver)
    assert inbox.items == []


def test_a_stopped_node_runs_no_debounced_call(make_node: Callable[[], Application]) -> None:
    node = make_node()
    inbox = Inbox()
    node.pub_sub_manager.subscribe("news", inbox, debounce=0.1)
    node.pub_sub_manager.stop()
    node.pub_sub_manager.publish("news", "after stop", only_self=True)
    # A call wrongly accepted would be pending now (its debounce is 0.1 s): nothing is, and no thread runs one
    assert node.pub_sub_manager.debouncer.idle()
    assert inbox.items == []
