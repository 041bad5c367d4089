"""The cluster-wide rate limit, measured: two Celery workers of two pool processes each on Redis share one limit of
``"20/s"``; over a window of ``NOCLUSTER_RATE_WINDOW`` seconds (10 by default) the runs stay within 20 per second
x the window, +-10%, counted from the handlers' own records. The limit also holds when every worker's processes
race for it (each runs at most 2 at once per node, and the backlog is larger than the window can run)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from nocluster.models import FailedMessage
from tests.conftest import unique_name
from tests.helpers import wait_until
from tests.queue.conftest import Cluster, celery_publisher, cleanup, cluster_env
from tests.queue.workers import kill_workers, start_workers

pytestmark = pytest.mark.cluster

RATE = 20  # "rated-fast" is subscribed with rate_limit="20/s" (tests/queue/scenarios.py)
WINDOW = float(os.environ.get("NOCLUSTER_RATE_WINDOW", "10"))
# Seconds from the first run to the window's start: the workers' first reservations are behind them by then.
SETTLE = 1.0


@pytest.fixture
def two_by_two(worker_database_url: str, redis_url: str) -> Iterator[Cluster]:
    """Two workers of a fresh project on Redis, two pool processes each."""
    name = unique_name("rate")
    env = cluster_env(name, redis_url, worker_database_url, redis_url)
    cluster = Cluster(name, "redis", celery_publisher(name, redis_url), env)
    cluster.workers = start_workers([f"r1-{name}", f"r2-{name}"], env, concurrency=2, include=cluster.include)
    try:
        yield cluster
    finally:
        kill_workers(cluster.workers)
        cleanup(cluster, redis_url)  # the queues and every key of the project, the rate limit's too


def test_a_rate_limit_holds_for_two_workers_of_two_processes_together(
    two_by_two: Cluster, transactional_db: None
) -> None:
    # Given more messages than the window can run at 20/s
    backlog = int(RATE * (SETTLE + WINDOW + 2))
    ids = set(two_by_two.app.event_queue.publish_many("rated-fast", list(range(backlog)), timeout=5))

    # When the window has passed (runs are counted from the handlers' records, not from the test's clock)
    first = wait_until(lambda: two_by_two.events("rated-fast"), timeout=60, message="a first run")[0]["t"]
    start, end = first + SETTLE, first + SETTLE + WINDOW
    events = wait_until(
        lambda: (found := two_by_two.events("rated-fast")) and found[-1]["t"] >= end and found,
        timeout=WINDOW + 60,
        message="runs past the window",
    )

    # Then the runs within the window are 20/s x the window, +-10%, each a first try of its own message
    inside = [event for event in events if start <= event["t"] < end]
    print(f"rate limit 20/s over {WINDOW:g} s: {len(inside)} runs (2 workers x 2 processes, backlog {backlog})")
    assert RATE * WINDOW * 0.9 <= len(inside) <= RATE * WINDOW * 1.1
    assert len({event["id"] for event in inside}) == len(inside)
    assert {event["id"] for event in inside} <= ids
    assert {event["retried"] for event in events} == {0}
    # And both workers ran some (the limit is shared, not one worker's)
    assert len({event["node"] for event in inside}) == 2
    assert not FailedMessage.objects.filter(message_id__in=ids).exists()
