"""The operator's management commands, run as subprocesses on the real servers: publish and cluster.

(``locks`` is covered in ``tests/locks/test_redis.py``.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.helpers import ROOT, NodeProcess, free_port, wait_until

QUEUE_CHANNEL = "tasks.async_task_manager.checksum"  # subscribed in every process by the async_task_manager plugin


def manage(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def cluster_env(node_env: dict[str, str], broker_url: str) -> dict[str, str]:
    """A node's environment on a real broker for pub/sub and the event queue (Redis, then RabbitMQ)."""
    return {**node_env, "BROKER_URL": broker_url, "PUBSUB_URL": broker_url}


@pytest.fixture
def listener(cluster_env: dict[str, str]) -> Iterator[NodeProcess]:
    with NodeProcess("tests.pubsub.scenario:handle", env=cluster_env) as node:
        node.request({"cmd": "subscribe", "channel": "news", "key": "news"})
        node.request({"cmd": "sync_channel", "channel": "schema", "key": "schema"})
        yield node


@pytest.mark.cluster
def test_publish_sends_pub_sub_and_sync_messages_to_running_nodes(
    cluster_env: dict[str, str], listener: NodeProcess
) -> None:
    # A payload from the argument, three copies, with a progress bar on stderr
    result = manage(cluster_env, "publish", "news", '{"n": 1}', "--count", "3")
    assert result.returncode == 0, result.stderr
    assert "published 3 pub/sub message(s) on 'news'" in result.stdout
    assert "3/3" in result.stderr
    wait_until(lambda: listener.request({"cmd": "received", "key": "news"}) == [{"n": 1}] * 3, timeout=15)

    # A sync message, payload from standard input
    result = manage(cluster_env, "publish", "schema", "--sync", stdin='{"collection": "posts"}')
    assert result.returncode == 0, result.stderr
    wait_until(
        lambda: {"collection": "posts"} in listener.request({"cmd": "received", "key": "schema"}),
        timeout=15,
        message="the sync message",
    )


@pytest.mark.cluster
def test_publish_queues_a_message_that_cluster_shows_in_the_queue_depth(cluster_env: dict[str, str]) -> None:
    # Given no worker consumes the channel, a queued message waits in the broker
    result = manage(cluster_env, "publish", QUEUE_CHANNEL, '{"rounds": 1}', "--queue", "--timeout", "5")
    assert result.returncode == 0, result.stderr
    report = json.loads(manage(cluster_env, "cluster", "--json").stdout)
    assert report["queues"]["depths"][QUEUE_CHANNEL] == 1
    assert all(entry["reachable"] for entry in report["backends"].values()), report["backends"]
    assert report["backends"]["pubsub"]["backend"].endswith("KombuPubSubBackend")
    assert report["backends"]["event_queue"]["backend"].endswith("CeleryQueueBackend")
    assert report["backends"]["locks"]["backend"].endswith("RedisLockBackend")
    assert report["failed_messages"] == 0
    assert report["app"] == cluster_env["NOCLUSTER_NAME"]


@pytest.mark.cluster
def test_cluster_lists_registered_nodes(cluster_env: dict[str, str]) -> None:
    env = {**cluster_env, "NOCLUSTER_NODE_REGISTRY": "true", "NOCLUSTER_HEARTBEAT": "0.5"}
    with NodeProcess(env=env) as node:
        report = wait_until(
            lambda: (r := json.loads(manage(cluster_env, "cluster", "--json").stdout))["nodes"] and r,
            timeout=30,
            message="the node in the registry",
        )
        assert [(n["instance_id"], n["state"]) for n in report["nodes"]] == [(node.instance_id, "up")]
        text = manage(cluster_env, "cluster").stdout
        assert node.instance_id[:12] in text and "Backends" in text and "Failed queue messages: 0" in text


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["publish", "news", "{not json"], None, "payload is not JSON"),
        (["publish", "news", "[1]", "--count", "0"], None, "--count must be at least 1"),
        (["publish", "bad channel", "[1]"], None, "invalid channel name 'bad channel'"),
        (["publish", "nobody.listens", "[1]", "--queue"], None, "has no subscriber"),
        (["publish", "news", "[1]", "--timeout", "3"], None, "apply to --queue messages only"),
        (["publish", QUEUE_CHANNEL, "[1]", "--queue", "--timeout", "-1"], None, "timeout must be"),
        (["publish", QUEUE_CHANNEL, "[1]", "--queue", "--timeout", "nan"], None, "timeout must be a finite number"),
        (["publish", QUEUE_CHANNEL, "[1]", "--queue", "--max-retries", str(10**30)], None, "max_retries must be"),
        (["publish", "news", "-"], "[" * 10_000 + "]" * 10_000, "nested too deeply"),
        (["publish", "news", "-"], "[" * 150 + "]" * 150, "is nested deeper than 100 levels"),
        (["publish", "news", '"\\ud800"'], None, "cannot be encoded as UTF-8"),
        (["publish", "news", "-"], json.dumps("x" * 1_100_000), 'NOCLUSTER["PUBSUB"]["MAX_MESSAGE_BYTES"]'),
    ],
)
def test_publish_refuses_bad_input_with_a_one_line_error(
    node_env: dict[str, str], amqp_url: str, args: list[str], stdin: str | None, message: str
) -> None:
    error = one_line_error(manage({**node_env, "BROKER_URL": amqp_url}, *args, stdin=stdin))
    assert message in error


def test_publish_says_the_in_process_pub_sub_cannot_reach_nodes(node_env: dict[str, str]) -> None:
    assert "pub/sub is in-process" in one_line_error(manage(node_env, "publish", "news", "[1]"))


def test_publish_queues_on_the_database_queue_of_the_embedded_defaults(node_env: dict[str, str]) -> None:
    from nocluster.models import QueuedMessage

    # The embedded event queue is a table every process of the project shares: the message waits there for a node
    result = manage(node_env, "publish", QUEUE_CHANNEL, '{"rounds": 1}', "--queue")
    assert result.returncode == 0, result.stderr
    message_id = result.stdout.strip().rsplit(" ", 1)[-1]
    assert QueuedMessage.objects.filter(app_name=node_env["NOCLUSTER_NAME"], message_id=message_id).exists()


def test_cluster_check_fails_naming_the_unreachable_backends(node_env: dict[str, str]) -> None:
    down = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    result = manage({**node_env, "BROKER_URL": down, "PUBSUB_URL": down}, "cluster", "--check")
    assert "UNREACHABLE" in result.stdout
    assert one_line_error(result) == "CommandError: unreachable: pubsub, event_queue"
