"""What only the Celery backend has, with real worker processes on Redis and on RabbitMQ (the ``cluster``
fixture): the hard time limit, pool processes and workers killed, the longest timeout, and drain().

Tests share one pair of workers per broker; each test uses its own message ids. The worker-killing test runs
last in the module and replaces the worker it killed. What every backend does is in test_contract.py.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
from amqp.exceptions import PreconditionFailed
from kombu import Connection

from nocluster import Application
from nocluster.models import FailedMessage
from tests.conftest import unique_name
from tests.helpers import wait_until
from tests.queue import scenarios
from tests.queue.conftest import CELERY_BACKEND, Cluster, cleanup, cluster_env, kill_workers_until_recorded_failed
from tests.queue.scenarios import of
from tests.queue.workers import LIMIT_OPTIONS, kill_workers, start_workers

pytestmark = pytest.mark.cluster


def failed_record(message_id: str, timeout: float = 30.0) -> FailedMessage:
    return wait_until(
        lambda: FailedMessage.objects.filter(message_id=message_id).first(), timeout=timeout, message="failed record"
    )


def test_work_ignoring_even_the_soft_time_limit_is_killed_by_the_hard_limit(
    cluster: Cluster, transactional_db: None
) -> None:
    # Given work that ignores its signal and the soft time limit (timeout 1 s, grace 1 s)
    started = time.monotonic()
    deaf = cluster.app.event_queue.publish("deaf", {"sleep": 30}, timeout=1)

    # Then its pool process is killed at timeout + 2 x grace and the try is recorded failed, long before 30 s
    assert "TimeLimitExceeded" in failed_record(deaf, timeout=20).error
    assert time.monotonic() - started < 20
    # And the killed pool process was replaced: the worker still runs new work
    echo = cluster.app.event_queue.publish("echo", "after", timeout=5)
    wait_until(lambda: of(cluster.events("echo"), echo), timeout=30)
    cluster.drain()
    assert not of(cluster.events("deaf-end"), deaf)


def test_a_timeout_longer_than_the_queue_allows_is_refused(cluster: Cluster) -> None:
    # The longest timeout sizes the Redis visibility timeout, so a longer one could run twice
    with pytest.raises(ValueError, match=r"'echo'.*exceeds the longest this queue allows"):
        cluster.app.event_queue.publish("echo", {}, timeout=7)


def test_drain_waits_for_a_retry_waiting_out_its_delay(cluster: Cluster, transactional_db: None) -> None:
    # Given a message whose first try fails and whose retry waits out its backoff (0.2 s, on a worker or queued)
    message_id = cluster.app.event_queue.publish("flaky", {"succeed_at": 1}, timeout=5, max_retries=1)
    wait_until(lambda: of(cluster.events("flaky"), message_id), timeout=30)

    # When the queue drains, the retry has run: drain did not return while it was still pending
    cluster.drain()
    assert [event["retried"] for event in of(cluster.events("flaky"), message_id)] == [0, 1]


def test_a_killed_pool_process_s_message_is_run_again(cluster: Cluster, transactional_db: None) -> None:
    # Given a 3 s message running in a pool process
    message_id = cluster.app.event_queue.publish("long", {"sleep": 3}, timeout=6)
    start = wait_until(lambda: of(cluster.events("long-start"), message_id), timeout=30)[0]

    # When that pool process is killed with SIGKILL (its worker lives on)
    os.kill(start["pid"], signal.SIGKILL)

    # Then Celery retries it (task_retry_on_worker_lost) and it completes once, without a failed record
    done = wait_until(lambda: of(cluster.events("long-done"), message_id), timeout=40)
    assert len(done) == 1 and done[0]["pid"] != start["pid"]
    assert not FailedMessage.objects.filter(message_id=message_id).exists()


def test_a_message_that_keeps_ending_its_process_is_recorded_failed(cluster: Cluster, transactional_db: None) -> None:
    # Given work that ends its own pool process (os._exit) every time
    message_id = cluster.app.event_queue.publish("poison", None, timeout=6)
    echo = cluster.app.event_queue.publish("echo", "meanwhile", timeout=5)

    # Then it runs max_deliveries (5) times in all, then is recorded failed, not looped; the worker goes on
    record = failed_record(message_id, timeout=60)
    assert "WorkerLostError" in record.error
    cluster.drain()
    assert len(of(cluster.events("poison"), message_id)) == cluster.app.event_queue.backend.max_deliveries == 5  # type: ignore[attr-defined]
    assert of(cluster.events("echo"), echo)


def test_a_message_that_keeps_killing_its_whole_worker_is_recorded_failed(
    amqp_cluster: Cluster, transactional_db: None
) -> None:
    cluster = amqp_cluster  # on Redis: tests/queue/test_gone_workers.py (workers gone after 3 s)
    # Given work that kills its whole worker (main process and pool) every time, on a supervised cluster
    message_id = cluster.app.event_queue.publish("kill-worker", None, timeout=6)

    # When every worker it kills is started again
    record = kill_workers_until_recorded_failed(cluster, message_id)

    # Then it killed its worker max_deliveries (5) times, was recorded failed with that reason, and ran no more
    assert "its worker died 5 times" in record.error
    assert len(of(cluster.events("kill-worker"), message_id)) == 5


def test_quorum_queues_on_rabbitmq_carry_work_and_retries(
    amqp_url: str, worker_database_url: str, redis_url: str, transactional_db: None
) -> None:
    # Given a project whose event queue uses RabbitMQ quorum queues (OPTIONS queue_type), and one worker of it
    name = unique_name("qq")
    env = {**cluster_env(name, amqp_url, worker_database_url, redis_url), "NOCLUSTER_QUEUE_TYPE": "quorum"}
    options = {"broker_url": amqp_url, **LIMIT_OPTIONS, "queue_type": "quorum"}
    app = Application({"NAME": name, "EVENT_QUEUE": {"BACKEND": CELERY_BACKEND, "OPTIONS": options}})
    scenarios.register(app)
    quorum = Cluster(name, "amqp", app, env)
    try:
        quorum.workers = start_workers([f"w1-{name}"], env, include=quorum.include)

        # When a message and one that fails once, then succeeds on its (delayed) retry, are published
        echo = app.event_queue.publish("echo", "on a quorum queue", timeout=5)
        flaky = app.event_queue.publish("flaky", {"succeed_at": 1}, timeout=5, max_retries=1)

        # Then both run, the retry included
        wait_until(lambda: of(quorum.events("echo"), echo), timeout=30)
        quorum.drain()
        assert [event["retried"] for event in of(quorum.events("flaky"), flaky)] == [0, 1]
        # And the worker saw it and turned global QoS off, which quorum queues refuse
        assert "Global QoS is disabled" in quorum.workers[0].log_text()
        # And the channel's queue is a quorum queue: RabbitMQ refuses to declare it classic
        with Connection(amqp_url) as connection, pytest.raises(PreconditionFailed, match="x-queue-type"):
            connection.default_channel.queue_declare(
                app.event_queue.full_channel("echo"),
                durable=True,
                auto_delete=False,
                arguments={"x-queue-type": "classic"},
            )
    finally:
        kill_workers(quorum.workers)
        cleanup(quorum, amqp_url)


def test_remote_control_uses_the_project_s_own_exchange_and_reaches_its_workers(cluster: Cluster) -> None:
    # Given the project's Celery app (what `celery -A nocluster.celery inspect ping` uses)
    celery_app = cluster.app.event_queue.backend.celery_app  # type: ignore[attr-defined]

    # Then its control commands go through an exchange named after the project, not Celery's celery.pidbox that
    # every project on the vhost shares (a `control shutdown` there stops the workers of all), and its events too;
    # neither can be the exchange of a channel ({name}.{channel}: a channel may be called "events")
    assert celery_app.control.mailbox.exchange.name == f"{cluster.name}:control.pidbox"
    assert celery_app.conf.event_exchange == f"{cluster.name}:events"
    channel_exchanges = {cluster.app.event_queue.full_channel(name) for name in ("events", "control.pidbox")}
    assert not channel_exchanges & {celery_app.conf.event_exchange, celery_app.control.mailbox.exchange.name}

    # And the project's workers listen there: a ping gets both of them
    expected = sorted(f"{worker.name}@{socket.gethostname()}" for worker in cluster.workers)
    replies = celery_app.control.ping(timeout=10, limit=len(expected))
    assert sorted(hostname for reply in replies for hostname in reply) == expected


def test_a_killed_worker_s_message_completes_on_another_worker(cluster: Cluster) -> None:
    # Given a 4 s message running on a worker
    message_id = cluster.app.event_queue.publish("long", {"sleep": 4}, timeout=6)
    start = wait_until(lambda: of(cluster.events("long-start"), message_id), timeout=30)[0]
    victim = cluster.worker_of(start["node"])
    killed_at = time.monotonic()

    # When that worker is killed with SIGKILL (main and pool processes)
    victim.kill()

    # Then the message runs again on the other worker and completes, once, within its timeout plus a minute
    done = wait_until(lambda: of(cluster.events("long-done"), message_id), timeout=6 + 60)
    assert time.monotonic() - killed_at < 6 + 60
    assert len(done) == 1 and done[0]["node"] != victim.pid
    assert [event["node"] for event in of(cluster.events("long-start"), message_id)][-1] == done[0]["node"]
    cluster.replace(victim)
