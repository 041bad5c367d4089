"""Routing: a node consumes only the channels it was told (a Celery worker's ``--channels`` option, or
``NOCLUSTER_WORKER_CHANNELS``), records them in the node registry, and ``manage.py cluster`` shows who consumes
each channel. In-process nodes on the database queue, and real Celery workers on Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from nocluster import Application, UnknownChannel
from nocluster.errors import InvalidChannel
from nocluster.models import Node
from nocluster.queue.message import Context
from tests.conftest import unique_name
from tests.helpers import ROOT, wait_until
from tests.queue import scenarios
from tests.queue.conftest import IN_PROCESS, IN_PROCESS_OPTIONS, Cluster, celery_publisher, cleanup, cluster_env
from tests.queue.workers import Worker, kill_workers

INCLUDE = "tests.queue.worker_scenarios"
SIDES = ("left", "right")


def in_process_app(name: str, kind: str, channels: object, ran: list[tuple[str, str, str]], tag: str) -> Application:
    """An application of project ``name`` subscribed to ``left`` and ``right``, consuming ``channels``; each run
    appends ``(tag, channel, message id)`` to ``ran``."""
    config = {"BACKEND": IN_PROCESS[kind], "OPTIONS": IN_PROCESS_OPTIONS, "CHANNELS": channels}
    app = Application({"NAME": name, "EVENT_QUEUE": config})

    def record(payload: Any, context: Context) -> None:
        ran.append((tag, context.channel, context.id))

    for channel in SIDES:
        app.event_queue.subscribe(channel, record, concurrency=2)
    return app


def test_two_nodes_of_the_database_queue_each_run_only_their_channels(transactional_db: None) -> None:
    # Given two nodes of one project sharing the database queue: one consumes "left", the other "right"
    name, ran = unique_name("route"), []
    left = in_process_app(name, "database", ["left"], ran, "left-node")
    right = in_process_app(name, "database", "right", ran, "right-node")
    for app in (left, right):
        app.event_queue.start()
    try:
        assert (left.event_queue.consumed_channels(), right.event_queue.consumed_channels()) == (["left"], ["right"])
        # When both channels get messages
        ids = {channel: set(left.event_queue.publish_many(channel, list(range(6)), timeout=5)) for channel in SIDES}
        # Then, once none is left, each ran once, on the node that consumes its channel
        assert left.event_queue.drain(30)
        assert sorted((channel, message_id) for _, channel, message_id in ran) == sorted(
            (channel, message_id) for channel, found in ids.items() for message_id in found
        )
        assert {(tag, channel) for tag, channel, _ in ran} == {("left-node", "left"), ("right-node", "right")}
    finally:
        for app in (left, right):
            app.event_queue.stop()


def test_a_memory_node_starts_consumers_for_its_channels_only() -> None:
    name, ran = unique_name("route"), []
    app = in_process_app(name, "memory", "left", ran, "node")
    app.event_queue.start()
    try:
        threads = [thread.name for thread in threading.enumerate() if thread.name.startswith(f"queue-{name}.")]
        assert sorted(threads) == [f"queue-{name}.left-0", f"queue-{name}.left-1"]
        assert app.event_queue.consumed_channels() == ["left"]
    finally:
        app.event_queue.stop()
    # A stopped node consumes nothing
    assert app.event_queue.consumed_channels() == []


def test_a_node_told_a_channel_nothing_subscribed_does_not_start() -> None:
    app = in_process_app(unique_name("route"), "memory", "left,nope", [], "node")
    with pytest.raises(UnknownChannel, match=r"NOCLUSTER_WORKER_CHANNELS.*'nope'.*subscribed: left, right"):
        app.event_queue.start()
    assert app.event_queue.consumed_channels() == []


@pytest.mark.parametrize(("channels", "match"), [("left,bad name", "invalid channel name 'bad name'"), (7, "list")])
def test_a_malformed_channel_list_is_refused_naming_the_setting(channels: object, match: str) -> None:
    config = {"BACKEND": IN_PROCESS["memory"], "CHANNELS": channels}
    app = Application({"NAME": unique_name("route"), "EVENT_QUEUE": config})
    with pytest.raises(InvalidChannel, match=rf'NOCLUSTER\["EVENT_QUEUE"\]\["CHANNELS"\].*{match}'):
        app.event_queue  # noqa: B018 (building it checks the setting)


# --- Celery workers ------------------------------------------------------------------------------------------------
@pytest.fixture
def routed(worker_database_url: str, redis_url: str) -> Iterator[dict[str, Any]]:
    """Two workers of a fresh project on Redis, in the node registry: one told ``--channels=echo``, the other
    ``NOCLUSTER_WORKER_CHANNELS=slow,rated``."""
    name = unique_name("route")
    env = {**cluster_env(name, redis_url, worker_database_url, redis_url), "NOCLUSTER_NODE_REGISTRY": "true"}
    publisher = celery_publisher(name, redis_url)
    workers = [
        Worker(f"echo-{name}", env, concurrency=2, include=INCLUDE, args=("--channels=echo",)),
        Worker(f"slow-{name}", {**env, "NOCLUSTER_WORKER_CHANNELS": "slow,rated"}, concurrency=2, include=INCLUDE),
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        yield {"name": name, "env": env, "publisher": publisher, "workers": workers}
    finally:
        kill_workers(workers)
        cleanup(Cluster(name, "redis", publisher), redis_url)


def cluster_report(env: dict[str, str]) -> dict[str, Any]:
    """``manage.py cluster --json`` in a process with the workers' subscriptions (the test scenarios)."""
    code = (
        "import django; django.setup(); import tests.queue.worker_scenarios; "
        "from django.core.management import call_command; call_command('cluster', '--json')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout), stderr=result.stderr)


@pytest.mark.cluster
def test_a_worker_told_one_channel_never_runs_another_channel_s_message(
    routed: dict[str, Any], transactional_db: None
) -> None:
    publisher, (echo_worker, slow_worker) = routed["publisher"], routed["workers"]
    # When both channels get messages
    echo = set(publisher.event_queue.publish_many("echo", list(range(8)), timeout=5))
    slow = set(publisher.event_queue.publish_many("slow", [{"sleep": 0.05}] * 6, timeout=5))

    # Then, once nothing is left anywhere, every one ran, each on the worker that consumes its channel
    assert publisher.event_queue.drain(60)
    events = scenarios.events(routed["name"])
    assert {event["id"] for event in events if event["kind"] == "echo"} == echo
    assert {event["id"] for event in events if event["kind"] == "slow"} == slow
    assert {event["node"] for event in events if event["kind"] == "echo"} == {echo_worker.pid}
    assert {event["node"] for event in events if event["kind"] == "slow"} == {slow_worker.pid}


@pytest.mark.cluster
def test_cluster_shows_who_consumes_each_channel_and_warns_of_channels_nobody_consumes(
    routed: dict[str, Any], transactional_db: None
) -> None:
    name = routed["name"]
    # Given the workers' pool processes in the registry (two per worker)
    wait_until(lambda: Node.objects.filter(app_name=name, stopped_at=None).count() >= 4, timeout=30)
    registered = {node.instance_id: node.channels for node in Node.objects.filter(app_name=name, stopped_at=None)}
    assert sorted(map(tuple, registered.values())) == [("echo",), ("echo",), ("rated", "slow"), ("rated", "slow")]

    # When the cluster is shown
    report = cluster_report(routed["env"])

    # Then each channel lists the live nodes that consume it, with its rate limit
    channels = report["channels"]
    by_channels = {tuple(found): [i for i, c in registered.items() if c == found] for found in registered.values()}
    assert sorted(channels["echo"]["consumers"]) == sorted(by_channels[("echo",)])
    assert sorted(channels["slow"]["consumers"]) == sorted(by_channels[("rated", "slow")])
    assert channels["rated"] == {"rate_limit": "10/s", "consumers": channels["slow"]["consumers"]}
    # And a subscribed channel no live node consumes is warned about
    assert channels["flaky"]["consumers"] == []
    assert "event queue channel 'flaky' is subscribed but no live node consumes it" in report["warnings"]
    assert "warning: event queue channel 'flaky'" in report["stderr"]
    assert not [warning for warning in report["warnings"] if "'echo'" in warning or "'slow'" in warning]

    # And with a process-local rate limiter, the rate limit consumed by two nodes is flagged as per process
    local = cluster_report({**routed["env"], "NOCLUSTER_RATE_LIMIT_URL": ""})
    assert local["backends"]["rate_limits"]["backend"].endswith("LocalRateLimiter")
    assert [warning for warning in local["warnings"] if "'rated': rate limit 10/s holds per process" in warning]
    assert report["backends"]["rate_limits"] == {
        "backend": "nocluster.queue.rates.backends.redis.RedisRateLimiter", "reachable": True, "error": None,
    }  # fmt: skip


@pytest.mark.cluster
def test_a_worker_told_a_channel_nothing_subscribed_stops_naming_it(worker_database_url: str, redis_url: str) -> None:
    env = cluster_env(unique_name("route"), redis_url, worker_database_url, redis_url)
    worker = Worker(f"bad-{env['NOCLUSTER_NAME']}", env, concurrency=1, include=INCLUDE, args=("--channels=echo,nope",))
    try:
        assert worker.proc.wait(90) == 78
    finally:
        worker.stop()
    log = worker.log_text()
    assert "cannot start: celery worker --channels=echo,nope names event queue channel(s) nothing subscribed" in log
    assert "'nope'" in log


@pytest.mark.cluster
def test_a_malformed_worker_channels_variable_stops_the_worker_naming_it(
    worker_database_url: str, redis_url: str
) -> None:
    env = {
        **cluster_env(unique_name("route"), redis_url, worker_database_url, redis_url),
        "NOCLUSTER_WORKER_CHANNELS": "echo,bad name",
    }
    worker = Worker(f"bad-{env['NOCLUSTER_NAME']}", env, concurrency=1, include=INCLUDE)
    try:
        assert worker.proc.wait(90) != 0
    finally:
        worker.stop()
    assert "NOCLUSTER_WORKER_CHANNELS" in worker.log_text() and "'bad name'" in worker.log_text()
