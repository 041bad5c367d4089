"""The Celery settings that decide whether work is lost or run twice, as the backend's own Celery app has them."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from nocluster import Application
from nocluster.queue.backends.celery_app import QueueLimits, visibility_timeout
from nocluster.queue.backends.redis_transport import OneClientTransport, one_client_transport
from tests.helpers import private_redis
from tests.queue.conftest import CELERY_BACKEND
from tests.queue.workers import LIMIT_OPTIONS


def celery_app(broker_url: str, **options: object) -> object:
    app = Application(
        {
            "NAME": "cfg",
            "EVENT_QUEUE": {
                "BACKEND": CELERY_BACKEND,
                "OPTIONS": {"broker_url": broker_url, **LIMIT_OPTIONS, **options},
            },
        }
    )
    return app.event_queue.backend.celery_app  # type: ignore[attr-defined]


def test_reliability_settings_are_forced(redis_url: str) -> None:
    conf = celery_app(redis_url).conf  # type: ignore[attr-defined]

    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_retry_on_worker_lost
    assert conf.worker_prefetch_multiplier == 2
    assert conf.worker_cancel_long_running_tasks_on_connection_loss
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.result_backend is None and conf.task_ignore_result


def test_the_redis_visibility_timeout_is_derived_from_the_longest_timeout(redis_url: str) -> None:
    # The longest life of an unacked message: retry delay (2) + 5 runs (2 prefetched, 2 countdowns and its own) x
    # (max timeout (6) + 2 x grace (1)) + margin (10)
    limits = QueueLimits(**LIMIT_OPTIONS)
    assert visibility_timeout(limits) == 2 + 5 * (6 + 2 * 1) + 10

    # And the channel really uses it (celery#9339: a setting that is not picked up stays at 3600 s)
    with celery_app(redis_url).connection_for_write() as connection:  # type: ignore[attr-defined]
        assert connection.default_channel.visibility_timeout == visibility_timeout(limits)
        assert connection.default_channel.global_keyprefix == "cfg:"


def test_a_worker_on_redis_acks_through_one_kept_client(redis_url: str) -> None:
    # A worker's consumer connection (connection_for_read) sends its QoS and ack commands through the channel's
    # one kept redis-py client, not a new client per command (redis/redis-py#3624)
    with celery_app(redis_url).connection_for_read() as connection:  # type: ignore[attr-defined]
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.ping()


def test_rediss_and_redis_socket_urls_keep_kombu_s_own_transport() -> None:
    # kombu turns TLS on for rediss:// only when it picks the transport by name: the one-client transport is for
    # redis:// only (the worker's connections and the publisher's)
    assert one_client_transport("redis://127.0.0.1:6379/0") is OneClientTransport
    assert one_client_transport("rediss://127.0.0.1:6380/0") is None
    assert one_client_transport("redis+socket:///run/redis.sock") is None
    with celery_app("rediss://127.0.0.1:6380/0").connection_for_write() as connection:  # type: ignore[attr-defined]
        assert connection.ssl


def test_rabbitmq_publishes_with_confirms(amqp_url: str) -> None:
    app = celery_app(amqp_url)
    assert app.conf.broker_transport_options["confirm_publish"] is True  # type: ignore[attr-defined]
    with app.connection_for_write() as connection:  # type: ignore[attr-defined]
        connection.ensure_connection()
        assert connection.connection.confirm_publish is True  # the py-amqp connection waits for broker acks


def test_the_outbox_relays_from_its_thread_where_a_publish_waits_for_a_confirm(redis_url: str, amqp_url: str) -> None:
    from nocluster.pubsub.backends.kombu import KombuPubSubBackend
    from nocluster.queue.backends.celery import CeleryQueueBackend

    # RabbitMQ confirms each publish (the outbox hands those sends to its thread); Redis answers at once
    assert CeleryQueueBackend(broker_url=amqp_url).publish_waits is True
    assert CeleryQueueBackend(broker_url=redis_url).publish_waits is False
    assert KombuPubSubBackend(url=amqp_url).publish_waits is True
    assert KombuPubSubBackend(url=redis_url).publish_waits is False


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"grace": True}, "option grace must be a number"),
        ({"max_timeout": float("nan")}, "option max_timeout must be a finite number"),
        ({"max_deliveries": 0}, "option max_deliveries"),
        ({"retries": 3}, "retries"),
        ({"queue_type": "stream"}, "option queue_type must be one of"),
        ({"queue_type": "quorum"}, "queue_type 'quorum' needs RabbitMQ"),
    ],
)
def test_bad_options_are_refused_naming_the_option(redis_url: str, options: dict[str, object], match: str) -> None:
    with pytest.raises((ImproperlyConfigured, TypeError, ValueError), match=match):
        celery_app(redis_url, **options)


def test_a_redis_broker_without_persistence_is_reported(redis_url: str) -> None:
    # The shared test Redis keeps nothing on disk (appendonly no), as a default redis-server does
    backend = Application(
        {"NAME": "cfg", "EVENT_QUEUE": {"BACKEND": CELERY_BACKEND, "OPTIONS": {"broker_url": redis_url}}}
    ).event_queue.backend
    assert any("appendonly yes" in warning for warning in backend.durability_warnings())


def test_a_redis_broker_with_persistence_and_no_eviction_is_not_reported() -> None:
    with private_redis("--appendonly", "yes", "--maxmemory-policy", "noeviction") as url:
        backend = Application(
            {"NAME": "cfg", "EVENT_QUEUE": {"BACKEND": CELERY_BACKEND, "OPTIONS": {"broker_url": url}}}
        ).event_queue.backend
        assert backend.durability_warnings() == []
        with private_redis("--appendonly", "yes", "--maxmemory-policy", "allkeys-lru") as evicting:
            other = Application(
                {"NAME": "cfg", "EVENT_QUEUE": {"BACKEND": CELERY_BACKEND, "OPTIONS": {"broker_url": evicting}}}
            ).event_queue.backend
            assert [w for w in other.durability_warnings() if "maxmemory-policy allkeys-lru" in w]


def test_rabbitmq_durable_queues_are_not_reported(amqp_url: str) -> None:
    backend = Application(
        {"NAME": "cfg", "EVENT_QUEUE": {"BACKEND": CELERY_BACKEND, "OPTIONS": {"broker_url": amqp_url}}}
    ).event_queue.backend
    assert backend.durability_warnings() == []
