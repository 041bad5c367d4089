"""A relay killed with kill -9 in the middle of a batch loses nothing, and no message runs twice.

Real processes on Redis: a node that commits 1,000 messages in one transaction and is killed while its relay
sends them (rows it sent but had not deleted yet are sent again), and two Celery workers whose nodes relay what
is left and drop the second copies before they run. The node's sending thread stops for good once the broker
took the first 500 (the scenario's ``freeze_after``), so the kill always lands between a send and its delete,
whatever the machine's speed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nocluster.models import OutboxMessage
from tests.conftest import unique_name
from tests.helpers import NodeProcess, wait_until
from tests.queue.conftest import Cluster, celery_publisher, cleanup, cluster_env
from tests.queue.workers import kill_workers, start_workers

pytestmark = pytest.mark.cluster
COUNT = 1000
SENT_BEFORE_THE_KILL = 500  # a whole batch of publish_many (BATCH_SIZE)


@pytest.fixture
def relay_cluster(worker_database_url: str, redis_url: str, transactional_db: None) -> Iterator[Cluster]:
    name = unique_name("relay")
    env = cluster_env(name, redis_url, worker_database_url, redis_url)
    cluster = Cluster(name, "redis", celery_publisher(name, redis_url), env)
    try:
        cluster.workers = start_workers([f"w1-{name}", f"w2-{name}"], env, include=cluster.include)
        yield cluster
    finally:
        kill_workers(cluster.workers)
        cleanup(cluster, redis_url)


def relayed(cluster: Cluster) -> list[int]:
    return [e["payload"]["relay"] for e in cluster.events("echo") if isinstance(e["payload"], dict)]


def test_a_relay_killed_mid_batch_loses_nothing_and_no_copy_runs_twice(relay_cluster: Cluster) -> None:
    cluster = relay_cluster
    node = NodeProcess("tests.outbox.scenario:handle", env=cluster.env).spawn().wait_ready(90)
    try:
        # Given a node relaying the 1,000 messages it committed in one transaction
        node.request({"cmd": "publish_in_transaction", "count": COUNT, "freeze_after": SENT_BEFORE_THE_KILL})
        wait_until(lambda: len(relayed(cluster)) >= 50, timeout=60, message="the first sent messages to run")
        # When it is killed with kill -9 after the broker took 500, before it deleted a row (the other nodes'
        # relays may have taken over some rows already: they are 5 s old, NOCLUSTER["OUTBOX"]["TAKEOVER"])
        node.kill()
        left = OutboxMessage.objects.filter(app_name=cluster.name).count()
    finally:
        node.stop()

    # Then the workers' relays send what was left, and every message ran exactly once
    wait_until(lambda: not OutboxMessage.objects.filter(app_name=cluster.name).exists(), timeout=60)
    cluster.drain()
    runs = relayed(cluster)
    assert sorted(runs) == list(range(COUNT))
    dropped = sum(worker.log_text().count("a second copy of a relayed message") for worker in cluster.workers)
    # Each message the broker took from the killed node came again from another node's relay, and was dropped
    assert dropped == SENT_BEFORE_THE_KILL
    print(f"relay killed with {left} rows left; {dropped} second copies delivered and dropped, 0 ran twice")
