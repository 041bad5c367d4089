"""The transactional outbox on the embedded backends: rows commit and roll back with the caller's data, wait while
their target refuses them, and leave once it took them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import transaction

from nocluster import Application
from nocluster.models import InstalledPlugin, OutboxMessage, RelayedRun
from nocluster.queue.message import Message
from nocluster.testing import drain, wait_until
from tests.conftest import unique_name
from tests.helpers import in_outbox
from tests.pubsub.test_contract import Inbox

MEMORY = "nocluster.queue.backends.memory.MemoryQueueBackend"
LOCAL = "nocluster.pubsub.backends.local.LocalPubSubBackend"


@pytest.fixture
def nodes(transactional_db: None) -> Iterator[tuple[Application, Application]]:
    """Two started nodes on one local bus, each with an in-process queue consuming channel ``jobs``."""
    name = unique_name("o")
    built = []
    for _ in range(2):
        node = Application(
            {
                "NAME": name,
                "PUBSUB": {"BACKEND": LOCAL, "OPTIONS": {"bus": name}},
                "EVENT_QUEUE": {"BACKEND": MEMORY, "OPTIONS": {"poll_interval": 0.02}},
                "OUTBOX": {"INTERVAL": 0.05, "BACKOFF_MAX": 0.2},
            }
        )
        built.append(node)
    yield built[0], built[1]
    for node in built:
        for component in (node.outbox, node.event_queue, node.pub_sub_manager):
            component.stop()


def start(node: Application, ran: list[Any]) -> None:
    node.event_queue.subscribe("jobs", lambda payload, context: ran.append(payload))
    node.pub_sub_manager.start()
    node.event_queue.start()


def test_rows_commit_with_the_data_and_leave_once_sent(nodes: tuple[Application, Application]) -> None:
    node, _ = nodes
    ran: list[Any] = []
    start(node, ran)
    # Given one transaction that rolls back and one that commits, each with a write and a message
    with pytest.raises(RuntimeError), transaction.atomic():
        InstalledPlugin.objects.create(name="rolled-back")
        message_id = node.event_queue.publish("jobs", "rolled back")
        assert in_outbox(message_id)  # written in the transaction (or waiting to be, with its commit)
        raise RuntimeError("roll back")
    with transaction.atomic():
        InstalledPlugin.objects.create(name="committed")
        node.event_queue.publish("jobs", "committed")

    # Then only the committed message ran, and no row is left
    assert node.event_queue.drain(10)
    assert ran == ["committed"]
    assert not OutboxMessage.objects.exists()


def test_a_target_that_refuses_keeps_the_row_and_the_other_callbacks_still_run(
    nodes: tuple[Application, Application],
) -> None:
    sender, receiver = nodes
    ran: list[Any] = []
    start(sender, ran)
    receiver.pub_sub_manager.start()
    inbox, callbacks = Inbox(), []
    receiver.sync_message_manager.subscribe("schema", inbox, debounce=0)
    queue_backend = sender.event_queue.backend

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionError("broker unreachable")

    # Given a queue that refuses at the commit, a sync message and another on_commit callback in one transaction
    queue_backend.publish = refuse  # type: ignore[method-assign]
    try:
        with transaction.atomic():
            sender.event_queue.publish("jobs", 1)
            sender.sync_message_manager.publish("schema", "reload")
            transaction.on_commit(lambda: callbacks.append("ran"))
        # Then the commit went through, the callback ran, the sync message arrived, and the queue row waits
        assert callbacks == ["ran"]
        drain(sender, receiver)
        assert inbox.items == ["reload"]
        row = OutboxMessage.objects.get()
        assert row.kind == "queue" and row.attempts == 1 and "ConnectionError: broker unreachable" in row.last_error
    finally:
        del queue_backend.publish
    # When the queue takes messages again, the relay thread sends the row by itself
    sender.outbox.start()
    wait_until(lambda: ran == [1] and not OutboxMessage.objects.exists(), timeout=10)


def test_any_node_relays_what_another_left_behind(nodes: tuple[Application, Application]) -> None:
    crashed, survivor = nodes
    ran: list[Any] = []
    start(survivor, ran)
    crashed.event_queue.subscribe("jobs", lambda payload, context: None)

    # Given rows that a node wrote and never sent (it died right after its commit)
    crashed.outbox.flush = lambda using="default": 0  # type: ignore[method-assign]
    with transaction.atomic():
        for n in range(5):
            crashed.event_queue.publish("jobs", n)
    assert OutboxMessage.objects.count() == 5

    # Then the other node's relay sends them, in order
    survivor.outbox.start()
    wait_until(lambda: sorted(ran) == list(range(5)) and not OutboxMessage.objects.exists(), timeout=10)


def test_a_second_copy_of_a_relayed_message_does_not_run(nodes: tuple[Application, Application]) -> None:
    node, _ = nodes
    ran: list[Any] = []
    start(node, ran)
    # Given a relayed message that ran
    with transaction.atomic():
        node.event_queue.publish("jobs", "once")
    assert node.event_queue.drain(10) and ran == ["once"]
    first = RelayedRun.objects.get(app_name=node.name)
    # When the same row is sent again (a relay killed between sending and deleting sends it twice)
    body = Message("jobs", "once", id=first.message_id, relayed=True).to_wire()
    node.event_queue.relay(OutboxMessage(app_name=node.name, kind="queue", channel="jobs", body=body))
    # Then it is dropped before it runs
    assert node.event_queue.drain(10)
    assert ran == ["once"]


def test_the_same_copy_delivered_again_runs_again(nodes: tuple[Application, Application]) -> None:
    node, _ = nodes
    ran: list[Any] = []
    start(node, ran)
    # Given a relayed message that started (its ledger entry written) and whose worker died
    message = Message("jobs", "again", relayed=True, send_id="s1")
    assert not node.event_queue.ledger.is_second_copy(message)
    # When the broker delivers that same copy again, it runs (at least once); another send of it would not
    node.event_queue.backend.publish(node.event_queue.full_channel("jobs"), message)
    assert node.event_queue.drain(10)
    assert ran == ["again"]
    assert node.event_queue.ledger.is_second_copy(Message("jobs", "again", id=message.id, relayed=True, send_id="s2"))


def test_publishing_to_a_stopped_queue_is_refused(nodes: tuple[Application, Application]) -> None:
    from nocluster import QueueStopped

    node, _ = nodes
    start(node, [])
    node.event_queue.stop()
    with pytest.raises(QueueStopped, match="'jobs'"):
        node.event_queue.publish("jobs", 1)


def test_a_commit_does_not_wait_for_a_confirm_and_the_relay_sends_in_commit_order_in_batches(
    nodes: tuple[Application, Application],
) -> None:
    node, _ = nodes
    ran: list[Any] = []
    start(node, ran)
    node.outbox.start()
    backend = node.event_queue.backend
    backend.publish_waits = True  # as on RabbitMQ: each publish waits for the broker's confirm
    entered, release, batches = threading.Event(), threading.Event(), []
    publish, publish_many = backend.publish, backend.publish_many

    def slow_publish(*args: Any, **kwargs: Any) -> None:
        entered.set()
        assert release.wait(10), "never released"
        publish(*args, **kwargs)

    def counted_publish_many(channel: str, messages: list[Message]) -> None:
        batches.append([message.payload for message in messages])
        publish_many(channel, messages)

    backend.publish = slow_publish  # type: ignore[method-assign]
    backend.publish_many = counted_publish_many  # type: ignore[method-assign]
    try:
        # Given a broker that does not answer, three commits each return while the first send still waits
        for n in range(3):
            with transaction.atomic():
                node.event_queue.publish("jobs", n)
            if n == 0:
                assert entered.wait(10), "the relay thread never sent the first commit's message"
        assert not release.is_set() and ran == [] and not node.outbox.wait_handed_off(0.05)
        # When it answers, the relay sends them in commit order, the two that waited in one batch
        release.set()
        assert node.outbox.wait_handed_off(10)
        assert node.event_queue.drain(10)
        assert ran == [0, 1, 2]
        assert batches == [[1, 2]]
        wait_until(lambda: not OutboxMessage.objects.exists(), timeout=10)
    finally:
        release.set()
        del backend.publish, backend.publish_many, backend.publish_waits


def test_a_quick_send_is_made_by_the_committing_thread(nodes: tuple[Application, Application]) -> None:
    node, _ = nodes
    ran: list[Any] = []
    start(node, ran)
    node.outbox.start()
    backend, senders = node.event_queue.backend, []
    publish = backend.publish

    def recorded_publish(*args: Any, **kwargs: Any) -> None:
        senders.append(threading.current_thread())
        publish(*args, **kwargs)

    backend.publish = recorded_publish  # type: ignore[method-assign]
    try:
        # Given a backend whose publish does not wait for a confirm (Redis) and no row waiting before
        assert node.outbox.wait_handed_off(10)
        wait_until(lambda: not node.outbox._backlog, timeout=10)  # the relay has looked at the table once
        with transaction.atomic():
            node.event_queue.publish("jobs", "quick")
        # Then the commit sent it itself, before returning
        assert senders == [threading.current_thread()]
        assert node.event_queue.drain(10) and ran == ["quick"]
    finally:
        del backend.publish


def test_the_run_gate_records_a_relayed_message_in_its_own_statement(
    nodes: tuple[Application, Application],
) -> None:
    from django.db import connection

    node, _ = nodes
    if connection.vendor != "postgresql":
        pytest.skip("the one-statement gate is PostgreSQL's")
    queue = node.event_queue
    first = Message("jobs", "x", relayed=True, send_id="s1")

    def gate(message: Message) -> bool:
        claim = queue.ledger.claim_sql(message)
        assert claim is not None
        _, _, columns = queue.control.run_gate(message.id, "jobs", claim)
        return queue.ledger.judge(message, bool(columns[0]), columns[1])

    # The first copy is recorded; the same copy again runs again; a copy from another send is a second copy
    assert gate(first) is False
    assert RelayedRun.objects.get(message_id=first.id).send_id == "s1"
    assert gate(first) is False
    assert gate(Message("jobs", "x", id=first.id, relayed=True, send_id="s2")) is True
    # A first send id the statement's snapshot missed is read again
    assert queue.ledger.judge(Message("jobs", "x", id=first.id, relayed=True, send_id="s2"), False, None) is True
    # Its relaxed commit is the statement's own: the session still waits for the disk
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"
