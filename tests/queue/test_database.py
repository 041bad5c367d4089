"""What only the database backend (the embedded default) shows: any process of the project consumes what another
published, and a message whose node died runs again once its lease expires."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.utils import timezone

from nocluster import Application
from nocluster.models import QueuedMessage
from nocluster.queue.message import Message
from tests.conftest import unique_name
from tests.queue import scenarios
from tests.queue.conftest import IN_PROCESS, IN_PROCESS_OPTIONS, delete_keys
from tests.queue.scenarios import of

DATABASE = IN_PROCESS["database"]


@pytest.fixture
def project(transactional_db: None) -> Iterator[tuple[Application, Application]]:
    """Two Applications of one project on the database queue: a publisher that consumes nothing, a consumer."""
    name = unique_name("d")
    publisher, consumer = (
        Application({"NAME": name, "EVENT_QUEUE": {"BACKEND": DATABASE, "OPTIONS": {**IN_PROCESS_OPTIONS, "lease": 1}}})
        for _ in range(2)
    )
    for app in (publisher, consumer):
        scenarios.register(app)
    yield publisher, consumer
    consumer.event_queue.stop()
    delete_keys(name)


def test_what_one_process_publishes_another_runs(project: tuple[Application, Application]) -> None:
    publisher, consumer = project
    # Given a publisher whose queue is never started (a manage.py shell, a web request)
    message_id = publisher.event_queue.publish("echo", "from the shell")
    assert QueuedMessage.objects.filter(message_id=message_id).exists()

    # When a consumer of the same project starts, it runs the message, and the row is gone
    consumer.event_queue.start()
    assert consumer.event_queue.drain(10)
    assert [event["payload"] for event in of(scenarios.events(publisher.name, "echo"), message_id)] == [
        "from the shell"
    ]


def test_a_message_leased_by_a_dead_node_runs_again_once_its_lease_expired(
    project: tuple[Application, Application],
) -> None:
    publisher, consumer = project
    # Given a message taken by a node that died (its lease runs 0.5 s more, and nobody renews it)
    message = Message("echo", "orphan")
    QueuedMessage.objects.create(
        app_name=publisher.name, channel="echo", message_id=message.id, body=message.to_wire(),
        due=timezone.now(), lease_owner="dead" * 8, lease_until=timezone.now() + timedelta(seconds=0.5),
    )  # fmt: skip

    # Then a live node runs it after the lease, once
    consumer.event_queue.start()
    assert consumer.event_queue.drain(10)
    assert len(of(scenarios.events(publisher.name, "echo"), message.id)) == 1
