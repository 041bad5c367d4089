"""The Celery settings that decide whether work is lost or run twice, as the project's Celery app has them."""

from __future__ import annotations

from typing import Any

import pytest

from nocluster.celery import create_app, queue_limits, visibility_timeout
from tests.queue.workers import QUEUE_LIMITS


@pytest.fixture
def limits(settings: Any) -> dict[str, float]:
    for key, value in QUEUE_LIMITS.items():
        setattr(settings, key, float(value))
    return queue_limits()


def test_reliability_settings_are_forced(limits: dict[str, float], redis_url: str) -> None:
    conf = create_app(broker_url=redis_url, app_name="cfg").conf

    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_retry_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_cancel_long_running_tasks_on_connection_loss
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.result_backend is None and conf.task_ignore_result


def test_the_redis_visibility_timeout_is_derived_from_the_longest_timeout(
    limits: dict[str, float], redis_url: str
) -> None:
    # The longest life of an unacked message: retry delay (2) + max timeout (10) + 2 x grace (1) + margin (10)
    assert visibility_timeout(limits) == 2 + 3 * (10 + 2 * 1) + 10
    celery_app = create_app(broker_url=redis_url, app_name="cfg")

    # And the channel really uses it (celery#9339: a setting that is not picked up stays at 3600 s)
    with celery_app.connection_for_write() as connection:
        assert connection.default_channel.visibility_timeout == visibility_timeout(limits)
        assert connection.default_channel.global_keyprefix == "cfg:"


def test_rabbitmq_publishes_with_confirms(limits: dict[str, float], amqp_url: str) -> None:
    celery_app = create_app(broker_url=amqp_url, app_name="cfg")

    assert celery_app.conf.broker_transport_options["confirm_publish"] is True
    with celery_app.connection_for_write() as connection:
        connection.ensure_connection()
        assert connection.connection.confirm_publish is True  # the py-amqp connection waits for broker acks
