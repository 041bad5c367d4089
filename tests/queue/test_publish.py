"""What the Celery backend's lean publish sends (nocluster/queue/backends/celery_publish.py), read back from the real
broker: ordinary Celery protocol-2 task messages, in order, and a batch RabbitMQ refuses is not reported queued."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from amqp.exceptions import MessageNacked
from kombu import Connection, Exchange, Producer, Queue

from nocluster.errors import PublishError
from nocluster.queue.backends.celery import celery_queue
from nocluster.queue.backends.celery_app import QueueLimits, build_celery_app, is_redis
from nocluster.queue.backends.celery_publish import REDIS_CONNECTION_ERRORS, CeleryPublisher, Outgoing
from nocluster.queue.backends.celery_worker import TASK_NAME
from nocluster.queue.message import Message
from tests.conftest import unique_name
from tests.queue.conftest import celery_publisher, delete_keys
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.cluster


class Project:
    def __init__(self, broker_url: str, transport_options: dict[str, Any] | None = None) -> None:
        self.broker_url = broker_url
        self.name = unique_name("pub")
        self.celery_app = build_celery_app(broker_url, self.name, QueueLimits(), transport_options or {})
        self.publisher = CeleryPublisher(
            self.celery_app, is_redis(broker_url), lambda m: (m.timeout + 5, m.timeout + 10)
        )
        self.queues: list[Queue] = []

    def queue(self, suffix: str = "work", **arguments: object) -> Queue:
        full = f"{self.name}.{suffix}"
        queue = Queue(full, Exchange(full, type="direct"), routing_key=full, durable=True, **arguments)  # type: ignore[arg-type]
        self.queues.append(queue)
        return queue

    def taken(self, queue: Queue) -> list[tuple[dict[str, object], object]]:
        """Every message waiting on ``queue`` (headers, decoded body), oldest first."""
        found = []
        with self.celery_app.connection_for_read() as connection:
            bound = queue(connection.default_channel)
            while (message := bound.get(no_ack=True)) is not None:
                found.append((dict(message.headers), message.decode()))
        return found

    def close(self) -> None:
        self.publisher.close()
        with Connection(self.broker_url, transport_options=self.celery_app.conf.broker_transport_options) as connection:
            for queue in self.queues:
                queue(connection.default_channel).delete()
        delete_keys(self.name)


@pytest.fixture
def project(broker_url: str) -> Iterator[Project]:
    result = Project(broker_url)
    yield result
    result.close()


@pytest.mark.parametrize("count", [1, 7])
def test_messages_go_out_as_celery_task_messages_in_order(project: Project, count: int) -> None:
    # When a batch of messages (or one) is published to a channel's queue
    queue = project.queue()
    messages = [Message("work", {"n": n}, 15.0, 2) for n in range(count)]
    project.publisher.publish([Outgoing(queue, message) for message in messages])

    # Then the queue holds protocol-2 Celery messages of the delivery task, in order, each with its time limits
    taken = project.taken(queue)
    assert [body[0][0]["id"] for _, body in taken] == [message.id for message in messages]  # type: ignore[index]
    for headers, body in taken:
        assert headers["task"] == TASK_NAME and headers["lang"] == "py"
        assert headers["timelimit"] == [25.0, 20.0]
        assert body[1] == {} and set(body[2]) == {"callbacks", "errbacks", "chain", "chord"}  # type: ignore[index]
        assert body[0][0]["channel"] == "work" and body[0][0]["max_retries"] == 2  # type: ignore[index]


def stored_envelopes(project: Project, redis_url: str, queue: Queue) -> list[dict[str, Any]]:
    """The raw envelopes waiting in ``queue``'s Redis list, oldest first (a worker pops from the tail)."""
    prefix = project.celery_app.conf.broker_transport_options["global_keyprefix"]
    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(raw) for raw in reversed(client.lrange(f"{prefix}{queue.name}", 0, -1))]
    finally:
        client.close()


def decoded_body(envelope: dict[str, Any]) -> Any:
    """The task body of a stored envelope, decoded as its ``body_encoding`` says (base64, or none for utf-8)."""
    raw = envelope["body"]
    return json.loads(base64.b64decode(raw) if envelope["properties"]["body_encoding"] == "base64" else raw)


def with_ids_blanked(envelope: dict[str, Any]) -> dict[str, Any]:
    """``envelope`` with what differs between two messages of the same payload (ids, tags, times) blanked, and
    its body decoded; checks the ids it blanks are well formed."""
    headers, properties = dict(envelope["headers"]), dict(envelope["properties"])
    assert headers["id"] == headers["root_id"] == properties["correlation_id"]
    uuid.UUID(headers["id"]), uuid.UUID(properties["delivery_tag"])
    body = decoded_body(envelope)
    wire = body[0][0]
    assert headers["argsrepr"] == f"({wire['channel']!r}, id={wire['id']!r}, retried={wire['retried']})"
    for key in ("id", "root_id", "argsrepr"):
        headers[key] = "-"
    properties["correlation_id"] = properties["delivery_tag"] = "-"
    wire["id"] = wire["published_at"] = "-"
    return {**envelope, "headers": headers, "properties": properties, "body": body}


@pytest.mark.parametrize(
    "options",
    [{}, {"body_encoding": "utf-8"}, {"retry_on_timeout": True}],
    ids=["defaults", "body_encoding", "retry_on_timeout"],
)
def test_what_the_publisher_stores_on_redis_is_what_kombu_stores(redis_url: str, options: dict[str, Any]) -> None:
    # On Redis the publisher writes messages itself (not through kombu's Producer.publish): it must store what
    # kombu stores, so that a stock Celery worker reads it, with the transport options that change what or how
    # kombu writes (retry_on_timeout: a batch goes one message at a time, as kombu would send it)
    project = Project(redis_url, options)
    try:
        first, second = project.queue("first"), project.queue("second")
        # Given one message published through kombu's Producer.publish (as for any other kombu transport), and
        # by the publisher one alone, a batch to one queue and one interleaved across two queues
        with project.celery_app.connection_for_write() as connection:
            project.publisher._send(Producer(connection), Outgoing(first, Message("work", {"n": 1}, 15.0, 2)), False)
        project.publisher.publish([Outgoing(first, Message("work", {"n": 1}, 15.0, 2))])
        project.publisher.publish([Outgoing(first, Message("work", {"n": 1}, 15.0, 2)) for _ in range(2)])
        mixed = [Outgoing(queue, Message("work", {"n": 1}, 15.0, 2)) for queue in (first, second, first, second)]
        project.publisher.publish(mixed)

        # Then every envelope is kombu's, field for field, but for the ids each message has of its own
        stored_first, stored_second = (
            stored_envelopes(project, redis_url, first),
            stored_envelopes(project, redis_url, second),
        )
        by_kombu = with_ids_blanked(stored_first[0])
        assert by_kombu["properties"]["delivery_info"] == {"exchange": "", "routing_key": first.name}
        for envelope in stored_first[1:]:
            assert with_ids_blanked(envelope) == by_kombu
        for envelope in stored_second:
            expected = {**by_kombu, "properties": {**by_kombu["properties"], "delivery_info": {
                "exchange": "", "routing_key": second.name}}}  # fmt: skip
            assert with_ids_blanked(envelope) == expected
        # And each queue holds its messages in the order they were published
        ids = [[decoded_body(e)[0][0]["id"] for e in stored] for stored in (stored_first, stored_second)]
        assert ids[0][4:] == [mixed[0].message.id, mixed[2].message.id]
        assert ids[1] == [mixed[1].message.id, mixed[3].message.id]
        # And kombu reads them back as Celery messages
        assert len(project.taken(first)) == 6 and len(project.taken(second)) == 2
    finally:
        project.close()


def test_a_delayed_message_carries_its_eta(project: Project) -> None:
    queue = project.queue()
    project.publisher.publish([Outgoing(queue, Message("work", None, 15.0, 0), delay=30.0)])
    [(headers, _)] = project.taken(queue)
    assert headers["eta"]


def test_a_batch_rabbitmq_refuses_is_not_reported_queued(amqp_url: str) -> None:
    project = Project(amqp_url)
    try:
        # Given a queue that refuses what exceeds one message (RabbitMQ nacks the rest)
        queue = project.queue("full", max_length=1, queue_arguments={"x-overflow": "reject-publish"})
        # When three messages are published in one batch, the publish raises: not every one was confirmed
        with pytest.raises(MessageNacked, match="refused 2 of a batch of 3"):
            project.publisher.publish([Outgoing(queue, Message("full", n, 15.0, 0)) for n in range(3)])
        assert len(project.taken(queue)) == 1
        # And the next batch goes out on the same publisher
        other = project.queue()
        project.publisher.publish([Outgoing(other, Message("work", n, 15.0, 0)) for n in range(3)])
        assert len(project.taken(other)) == 3
    finally:
        project.close()


@pytest.mark.parametrize("count", [1, 5])
def test_a_kept_connection_dropped_while_idle_is_replaced_without_an_error(broker_url: str, count: int) -> None:
    # Given a publisher whose kept connection goes through a proxy, and one batch sent
    with TcpProxy.for_broker(broker_url) as proxy:
        project = Project(proxy.url(broker_url))
        try:
            queue = project.queue()
            project.publisher.publish([Outgoing(queue, Message("work", n, 15.0, 0)) for n in range(count)])
            # When the connection is dropped while idle (the broker restarted, a load balancer timed it out)
            proxy.cut()
            proxy.restore()
            # Then the next batch goes out on a new connection, without an error, and nothing is lost
            project.publisher.publish([Outgoing(queue, Message("work", n, 15.0, 0)) for n in range(count)])
            assert len(project.taken(queue)) == 2 * count
        finally:
            project.close()


def test_on_redis_a_single_publish_is_tried_again_after_a_reset_and_a_batch_is_not(redis_url: str) -> None:
    # Given a publisher whose kept connection goes through a proxy, its connection made by a first publish
    with TcpProxy.for_broker(redis_url) as proxy:
        project = Project(proxy.url(redis_url))
        try:
            queue = project.queue()
            project.publisher.publish([Outgoing(queue, Message("work", 0, 15.0, 0))])
            # When the connection is reset as the next publish sends its command (Redis never sees it)
            proxy.drop_next_request()
            project.publisher.publish([Outgoing(queue, Message("work", 1, 15.0, 0))])
            # Then that publish was tried again on a new connection and returned: each message is queued once
            assert proxy.requests_dropped == 1
            assert [body[0][0]["payload"] for _, body in project.taken(queue)] == [0, 1]  # type: ignore[index]
            # But a batch whose connection is reset fails as a whole (delivery uncertain), and is not sent again
            proxy.drop_next_request()
            with pytest.raises(REDIS_CONNECTION_ERRORS):
                project.publisher.publish([Outgoing(queue, Message("work", n, 15.0, 0)) for n in range(3)])
            assert proxy.requests_dropped == 2 and project.taken(queue) == []
        finally:
            project.close()


def test_a_publish_to_an_unreachable_broker_raises_publish_error_naming_the_channel(broker_url: str) -> None:
    # Given a node publishing outside a transaction through a proxy, its connection made by a first publish
    with TcpProxy.for_broker(broker_url) as proxy:
        app = celery_publisher(unique_name("down"), proxy.url(broker_url))
        try:
            app.event_queue.publish("echo", "before", timeout=5)
            # When the broker cannot be reached (open connections dropped, new ones refused)
            proxy.cut()
            started = time.monotonic()
            # Then the next publish raises PublishError naming the channel and the message, within the retries
            with pytest.raises(PublishError, match=r"queue channel 'echo': message [0-9a-f]{32} not queued"):
                app.event_queue.publish("echo", "refused", timeout=5)
            assert time.monotonic() - started < 20
            # And once the broker is back, publishing works again without a restart
            proxy.restore()
            app.event_queue.publish("echo", "after", timeout=5)
            with app.event_queue.backend.celery_app.connection_for_read() as connection:
                queue = celery_queue(app.event_queue.full_channel("echo"))(connection.default_channel)
                assert queue.queue_declare().message_count == 2
                queue.delete()
        finally:
            app.event_queue.backend.stop()
            delete_keys(app.name)
