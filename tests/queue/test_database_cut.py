"""PostgreSQL unreachable for 10 s under queue traffic: no message is lost, none loops, the log stays short.

Real processes on Redis: two Celery workers whose database connection goes through a TCP proxy that is cut. A
failed try whose failed record cannot be written is kept and settled again with a growing delay (never
re-queued at once), and ends in the failed store once the database is back.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from nocluster.models import FailedMessage
from tests.conftest import unique_name
from tests.helpers import wait_until
from tests.queue.conftest import Cluster, celery_publisher, cleanup, cluster_env
from tests.queue.scenarios import of
from tests.queue.workers import kill_workers, start_workers
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.cluster
CUT_SECONDS = 10.0


@pytest.fixture
def cut_database(
    worker_database_url: str, redis_url: str, transactional_db: None
) -> Iterator[tuple[Cluster, TcpProxy]]:
    parts = urlsplit(worker_database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    name = unique_name("pg")
    env = cluster_env(name, redis_url, proxy.url(worker_database_url), redis_url)
    cluster = Cluster(name, "redis", celery_publisher(name, redis_url), env)
    try:
        cluster.workers = start_workers([f"w1-{name}", f"w2-{name}"], env, include=cluster.include)
        yield cluster, proxy
    finally:
        proxy.restore()
        kill_workers(cluster.workers)
        cleanup(cluster, redis_url)
        proxy.close()


def test_a_database_cut_under_queue_traffic_ends_with_every_message_done_or_recorded(
    cut_database: tuple[Cluster, TcpProxy],
) -> None:
    cluster, proxy = cut_database
    queue = cluster.app.event_queue
    # Given the workers' database is unreachable
    proxy.cut()
    cut_at = time.monotonic()
    # When 20 messages that fail (and need a failed record) and 20 that succeed are published
    failing = [queue.publish("flaky", {"succeed_at": None}, timeout=5) for _ in range(20)]
    fine = [queue.publish("echo", {"pg": n}, timeout=5) for n in range(20)]
    wait_until(lambda: all(of(cluster.events("flaky"), m) for m in failing), timeout=30, message="every try")
    time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))  # the rest of the 10 s outage
    proxy.restore()

    # Then every message ends done or in the failed store, each failing one tried once
    wait_until(lambda: FailedMessage.objects.filter(message_id__in=failing).count() == 20, timeout=60)
    cluster.drain()
    assert {e["id"] for e in cluster.events("echo")} >= set(fine)
    assert Counter(e["id"] for e in cluster.events("flaky") if e["id"] in failing) == Counter(failing)

    # And the settling was retried a bounded number of times, with a bounded log per message
    logs = "".join(worker.log_text() for worker in cluster.workers)
    attempts = [int(n) for n in re.findall(r"failed try not settled \(attempt (\d+)", logs)]
    lines = Counter(m for line in logs.splitlines() for m in failing if m in line)
    assert attempts and max(attempts) <= 10, attempts
    assert max(lines.values()) < 100, lines.most_common(1)
    print(f"settle attempts per message during the cut: at most {max(attempts)}; log lines <= {max(lines.values())}")
