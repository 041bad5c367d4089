"""One trace from a request on node A, through a queue message run by a Celery worker and a sync message and a
pub/sub message handled on node B: real processes on Redis, each with OpenTelemetry's SDK (in-memory exporter).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import unique_name
from tests.helpers import start_nodes, stop_nodes
from tests.queue.conftest import Cluster, celery_publisher, cleanup, cluster_env
from tests.queue.workers import kill_workers, start_workers
from tests.tracing import channels

pytestmark = pytest.mark.cluster


@pytest.fixture
def traced_cluster(worker_database_url: str, redis_url: str, transactional_db: None) -> Iterator[Cluster]:
    name = unique_name("trace")
    env = cluster_env(name, redis_url, worker_database_url, redis_url)
    cluster = Cluster(name, "redis", celery_publisher(name, redis_url), env, include="tests.tracing.worker_scenario")
    channels.register(cluster.app)  # so that cleanup() deletes the traced channel's queue too
    try:
        cluster.workers = start_workers([f"w1-{name}"], env, concurrency=2, include=cluster.include)
        yield cluster
    finally:
        kill_workers(cluster.workers)
        cleanup(cluster, redis_url)


def test_a_request_s_trace_goes_through_a_worker_s_process_and_another_node_s_callbacks(
    traced_cluster: Cluster,
) -> None:
    cluster = traced_cluster
    node_a, node_b = nodes = start_nodes(2, cluster.env, scenario="tests.tracing.scenario:handle")
    try:
        # Given a request span on node A that queues a message and sends a sync and a pub/sub message
        request = node_a.request({"cmd": "request"})

        # Then the worker's process ran in a span of the request's trace, a child of the request's span
        run = cluster.wait_events("traced", 1)[0]
        assert (run["trace_id"], run["parent_id"], run["name"]) == (
            request["trace_id"], request["span_id"], "process traced",
        )  # fmt: skip
        # And node B's sync and pub/sub callbacks ran in CONSUMER spans of the same trace, children of the request
        sync = node_b.wait_event(lambda event: event.get("event") == "sync", timeout=30)
        pubsub = node_b.wait_event(lambda event: event.get("event") == "pubsub", timeout=30)
        spans_b = {span["span_id"]: span for span in node_b.request({"cmd": "spans"})}
        for event, name in ((sync, "receive sync.traced"), (pubsub, "receive traced")):
            span = spans_b[event["span_id"]]
            assert (span["name"], span["kind"]) == (name, "CONSUMER")
            assert (span["trace_id"], span["parent_id"]) == (request["trace_id"], request["span_id"])
            assert span["attributes"]["messaging.destination.name"] == name.removeprefix("receive ")
        # And node A's own spans are just the request: a publish makes no span of its own
        assert [span["name"] for span in node_a.request({"cmd": "spans"})] == ["GET /orders"]
    finally:
        stop_nodes(nodes)
