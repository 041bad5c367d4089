"""The acceptance test of the metrics: real processes make queue, pub/sub and lock traffic, and the web node's
``/metrics`` and the Celery worker's exporter count exactly what was sent.

One web node (``tests.node`` serving Django from a thread) publishes and takes locks; one Celery worker (main
process + 2 pool processes, each a node) runs the queue and receives the pub/sub messages. Each service has its
own multiprocess folder, removed at the end.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests.helpers import NodeProcess, free_port, wait_until
from tests.metrics.scenario import FAIL, HELD, NEWS, OK, WORKER_CHANNELS
from tests.metrics.scrape import Samples, by_label, fetch, parse, value
from tests.queue.conftest import delete_keys
from tests.queue.workers import QUEUE_LIMITS, Worker

TOKEN = "metrics-test-token"
SCENARIO = "tests.metrics.node_scenario"


@pytest.fixture
def metrics_dirs() -> Iterator[tuple[str, str]]:
    web, worker = tempfile.mkdtemp(prefix="nocluster-metrics-web-"), tempfile.mkdtemp(prefix="nocluster-metrics-w-")
    yield web, worker
    shutil.rmtree(web, ignore_errors=True)
    shutil.rmtree(worker, ignore_errors=True)


def scrape(url: str) -> Samples:
    status, body = fetch(url, TOKEN)
    assert status == 200, f"{url}: {status} {body[:500]}"
    return parse(body)


def test_web_node_and_worker_count_exactly_what_was_sent(
    node_env: dict[str, str], redis_url: str, app_name: str, metrics_dirs: tuple[str, str]
) -> None:
    # Given a web node and a Celery worker (2 pool processes) on Redis, metrics on, each with its own folder
    env = {**node_env, **QUEUE_LIMITS, "BROKER_URL": redis_url, "NOCLUSTER_NODE_REGISTRY": "true",
           "NOCLUSTER_METRICS": "true", "NOCLUSTER_METRICS_TOKEN": TOKEN}  # fmt: skip
    port = free_port()
    worker_env = {**env, "NOCLUSTER_METRICS_DIR": metrics_dirs[1], "NOCLUSTER_METRICS_PORT": str(port)}
    web = NodeProcess(f"{SCENARIO}:handle", env={**env, "NOCLUSTER_METRICS_DIR": metrics_dirs[0]}).spawn()
    worker = Worker(f"mw-{app_name}", worker_env, concurrency=2, include=SCENARIO,
                    args=("--channels", WORKER_CHANNELS))  # fmt: skip
    try:
        web.wait_ready()
        web_url = f"http://127.0.0.1:{web.request({'cmd': 'serve'})}/metrics"
        worker.wait_ready()
        worker_url = f"http://127.0.0.1:{port}/metrics"
        # Both refuse a scrape without the token (401) or with another one (403)
        for url in (web_url, worker_url):
            assert fetch(url)[0] == 401
            assert fetch(url, "wrong")[0] == 403
        # Once both pool processes are nodes (up in the registry, their pub/sub bound)
        wait_until(lambda: value(scrape(worker_url), "nocluster_nodes_up", role="worker") == 2, timeout=30,
                   message="2 worker nodes up")  # fmt: skip
        before = scrape(web_url)

        # When the web node publishes 5 + 2 failing (1 retry each) + 3 never consumed queue messages,
        # 4 pub/sub messages and 1 malformed envelope, and takes locks
        web.request({"cmd": "queue", "ok": 5, "failing": 2, "held": 3})
        web.request({"cmd": "news", "count": 4})
        web.request({"cmd": "malformed"})
        web.request({"cmd": "locks", "exclusive": 3})

        # Then the worker ran each try once, retried and recorded the failing ones, and each pool process
        # received every pub/sub message and dropped the malformed one
        def worker_settled() -> bool:
            found = scrape(worker_url)
            dropped = by_label(found, "nocluster_pubsub_messages_dropped_malformed_total", "node", channel=NEWS)
            return (value(found, "nocluster_queue_messages_failed_total", channel=FAIL) == 2
                    and value(found, "nocluster_queue_messages_run_total", channel=OK) == 5
                    and sorted(dropped.values()) == [1, 1])  # fmt: skip

        wait_until(worker_settled, timeout=30, message="the worker's counts")
        at_worker = scrape(worker_url)
        assert value(at_worker, "nocluster_queue_messages_run_total", channel=OK) == 5
        assert value(at_worker, "nocluster_queue_messages_run_total", channel=FAIL) == 4
        assert value(at_worker, "nocluster_queue_messages_retried_total", channel=FAIL) == 2
        assert value(at_worker, "nocluster_queue_messages_failed_total", channel=FAIL) == 2
        assert value(at_worker, "nocluster_queue_messages_failed_total", channel=OK) == 0
        assert value(at_worker, "nocluster_queue_messages_deferred_total", channel=OK) == 0
        assert value(at_worker, "nocluster_queue_run_seconds_count", channel=OK) == 5
        assert value(at_worker, "nocluster_queue_run_seconds_count", channel=FAIL) == 4
        received = by_label(at_worker, "nocluster_pubsub_messages_received_total", "node", channel=NEWS)
        assert sorted(received.values()) == [4, 4], received
        # ... and the messages nothing consumes wait, seen by both (a gauge read at scrape time)
        for found in (at_worker, scrape(web_url)):
            assert value(found, "nocluster_queue_depth", channel=HELD) == 3
            assert value(found, "nocluster_queue_oldest_age_seconds", channel=HELD) > 0
            assert value(found, "nocluster_nodes_up", role="worker") == 2
            assert value(found, "nocluster_nodes_up", role="node") == 1

        # And the web node counted what it published and its locks
        after = scrape(web_url)
        node = web.instance_id[:8] if web.instance_id else ""

        def added(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert added("nocluster_queue_messages_published_total", channel=OK) == 5
        assert added("nocluster_queue_messages_published_total", channel=FAIL) == 2
        assert added("nocluster_queue_messages_published_total", channel=HELD) == 3
        assert added("nocluster_pubsub_messages_published_total", channel=NEWS, node=node) == 4
        assert added("nocluster_lock_acquisitions_total", result="acquired") == 4
        assert added("nocluster_lock_acquisitions_total", result="timeout") == 1
        assert added("nocluster_lock_hold_seconds_count") == 3
        assert added("nocluster_lock_wait_seconds_count") == 4
        assert added("nocluster_lock_force_releases_total") == 1
        assert value(after, "nocluster_outbox_backlog") == 0
    finally:
        web.stop()
        worker.stop()
        worker.log.unlink(missing_ok=True)
        delete_keys(app_name)
