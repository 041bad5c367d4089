"""Nothing committed is lost when the broker is unreachable at the commit; nothing rolled back is ever sent.

Real servers and processes: a Celery worker and a publisher on Redis and on RabbitMQ, both through a TCP proxy
that is cut (the broker is gone for the whole project); four node processes on kombu, each behind its own proxy,
for sync messages.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import transaction

from nocluster.models import OutboxMessage
from plugins.async_task_manager.jobs import checksum
from tasks import api as tasks
from tasks.models import Task
from tests.conftest import unique_name
from tests.helpers import NodeProcess, wait_until
from tests.pubsub.test_nodes import in_sync, nodes_behind_proxies, received
from tests.queue.conftest import Cluster, celery_publisher, cleanup, cluster_env
from tests.queue.workers import kill_workers, start_workers
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.cluster

# The outage is 30 s (NOCLUSTER_TEST_CUT_SECONDS=30); the suite cuts for 10 s, which the relay's backoff
# (at most BACKOFF_MAX apart) already spans several times over.
CUT_SECONDS = float(os.environ.get("NOCLUSTER_TEST_CUT_SECONDS", "10"))
COMMITTED, ROLLED_BACK = 180, 20  # per kind (tasks and plain messages): 200 published in transactions each


@pytest.fixture
def cut_clusters(
    worker_database_url: str, redis_url: str, amqp_url: str, transactional_db: None
) -> Iterator[list[tuple[Cluster, TcpProxy]]]:
    """A project per broker (Redis, RabbitMQ), each behind a TCP proxy: a Celery worker and a publisher, whose relay
    runs. Both brokers are cut at the same time, so the two outages overlap."""
    made: list[tuple[Cluster, TcpProxy, str]] = []
    try:
        for broker, url in (("redis", redis_url), ("amqp", amqp_url)):
            proxy = TcpProxy.for_broker(url)
            name = unique_name("cut")
            env = cluster_env(name, proxy.url(url), worker_database_url, redis_url)
            publisher = celery_publisher(name, proxy.url(url))
            tasks.register("async_task_manager", "checksum", checksum, concurrency=2, app=publisher)
            cluster = Cluster(name, broker, publisher, env)
            made.append((cluster, proxy, url))
            cluster.workers = start_workers([f"w-{name}"], env, include=cluster.include)
            publisher.outbox.start()
        yield [(cluster, proxy) for cluster, proxy, _ in made]
    finally:
        for cluster, proxy, url in made:
            cluster.app.outbox.stop()
            kill_workers(cluster.workers)
            cleanup(cluster, url)
            proxy.close()


def publish_during_the_cut(cluster: Cluster) -> tuple[list[int], list[str]]:
    """200 tasks and 200 messages in transactions, 20 of each rolled back; return the committed ones."""
    app = cluster.app
    task_ids, message_ids = [], []
    for n in range(COMMITTED + ROLLED_BACK):
        rolled_back = n % 10 == 9
        try:
            with transaction.atomic():
                task = tasks.submit("async_task_manager", "checksum", {"rounds": 1, "pause": 0}, timeout=5, app=app)
                message_id = app.event_queue.publish("echo", {"cut": n}, timeout=5)
                if rolled_back:
                    raise RuntimeError("roll back")
        except RuntimeError:
            continue
        task_ids.append(task.pk)
        message_ids.append(message_id)
    return task_ids, message_ids


def test_committed_work_runs_after_a_broker_cut_and_rolled_back_work_never_does(
    cut_clusters: list[tuple[Cluster, TcpProxy]],
) -> None:
    # Given the broker is unreachable for the whole project (worker and publisher), on Redis and on RabbitMQ
    for _, proxy in cut_clusters:
        proxy.cut()
    cut_at = time.monotonic()
    # When 200 tasks and 200 messages are published in transactions during the cut, 20 of each rolled back
    published = {cluster.broker: publish_during_the_cut(cluster) for cluster, _ in cut_clusters}
    for cluster, _ in cut_clusters:
        task_ids, message_ids = published[cluster.broker]
        assert len(task_ids) == len(message_ids) == COMMITTED
        # Then every commit went through, and what it published waits in the outbox (no node can relay it)
        assert Task.objects.filter(pk__in=task_ids, status="queued").count() == COMMITTED
        assert OutboxMessage.objects.filter(app_name=cluster.name).count() == 2 * COMMITTED
    time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))  # the rest of the outage

    # When the broker is reachable again, the relay drains the outbox by itself
    for _, proxy in cut_clusters:
        proxy.restore()
    back_at = time.monotonic()
    for cluster, _ in cut_clusters:
        wait_until(lambda cluster=cluster: not OutboxMessage.objects.filter(app_name=cluster.name).exists(), timeout=60)
        print(f"{cluster.broker}: outbox empty {time.monotonic() - back_at:.1f} s after the broker was back")

    # Then every committed task and message ran once, none of the rolled-back ones, and nothing is left over
    for cluster, _ in cut_clusters:
        cluster.drain()
        task_ids, _ids = published[cluster.broker]
        assert Task.objects.filter(pk__in=task_ids, status="succeeded").count() == COMMITTED
        echoed = [event["payload"]["cut"] for event in cluster.events("echo") if isinstance(event["payload"], dict)]
        assert sorted(echoed) == [n for n in range(COMMITTED + ROLLED_BACK) if n % 10 != 9], cluster.broker
    assert Task.objects.filter(plugin="async_task_manager").count() == 2 * COMMITTED  # no rolled-back task row


@pytest.fixture(params=["redis", "amqp"])
def four_nodes(
    request: pytest.FixtureRequest, node_env: dict[str, str]
) -> Iterator[tuple[list[NodeProcess], list[TcpProxy]]]:
    url = request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url")
    with nodes_behind_proxies(node_env, url, 4) as made:
        yield made


def test_a_sync_message_and_another_callback_of_one_transaction_survive_a_broker_cut_at_commit(
    four_nodes: tuple[list[NodeProcess], list[TcpProxy]],
) -> None:
    nodes, proxies = four_nodes
    sender, others = nodes[0], nodes[1:]
    # Given the sender's broker connection is cut
    proxies[0].cut()
    # When it changes a collection (a sync message) in a transaction that also registers another callback
    sender.request(
        {"cmd": "ds_with_callback", "method": "create_collection", "args": ["cut_posts"], "key": "after-commit"}
    )
    # Then the commit and the other callback went through, and the sync message waits in the sender's outbox
    assert received(sender, "after-commit") == ["callback ran"]
    assert sender.request({"cmd": "outbox"})["pending"] == 1

    # When the broker is back, the relay sends it: every node has the collection and is in sync
    proxies[0].restore()
    wait_until(lambda: sender.request({"cmd": "outbox"})["pending"] == 0, timeout=30)
    for node in nodes:
        wait_until(lambda node=node: in_sync(node) and _has(node, "cut_posts"), timeout=30)
    assert all(in_sync(node) for node in others)


def _has(node: NodeProcess, collection: str) -> Any:
    return collection in node.request({"cmd": "ds_state"})["registry"]
