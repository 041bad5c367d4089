"""A subscriber stalled during a burst on Redis: Redis disconnects it (output buffer limit), the node notices when
it resumes, reconnects and resyncs; the publisher and the other nodes lose nothing.

A private ``redis-server`` on a free port with a smaller ``client-output-buffer-limit pubsub`` (8 MiB, no soft limit)
makes the disconnect happen after about 2,000 of the 10,000 messages instead of 32 MiB, while a live subscriber
keeps a wide margin; the shared server's configuration is never touched.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from tests.helpers import NodeProcess, private_redis, start_nodes, stop_nodes, wait_until
from tests.pubsub.test_nodes import SCENARIO, field_names, in_sync, received, wait_everywhere

MESSAGES = 10_000
SIZE = 4096


@pytest.fixture
def stalling_redis() -> Iterator[str]:
    """A throwaway redis-server that drops a pub/sub client once 8 MiB are queued for it."""
    with private_redis("--appendonly", "no", "--client-output-buffer-limit", "pubsub 8mb 0 0") as url:
        yield url


@pytest.fixture
def nodes(node_env: dict[str, str], stalling_redis: str) -> Iterator[list[NodeProcess]]:
    started = start_nodes(3, {**node_env, "PUBSUB_URL": stalling_redis}, scenario=SCENARIO)
    try:
        yield started
    finally:
        for node in started:
            if node.alive:
                os.kill(node.pid, signal.SIGCONT)
        stop_nodes(started)


@pytest.mark.cluster
def test_a_stalled_subscriber_is_dropped_by_redis_and_resyncs_while_the_others_lose_nothing(
    nodes: list[NodeProcess],
) -> None:
    one, two, three = nodes
    one.request({"cmd": "ds", "method": "create_collection", "args": ["events"]})
    wait_everywhere(nodes, "events", [], within=10)
    for node in (two, three):
        node.request({"cmd": "subscribe", "channel": "burst", "key": "burst"})

    # Given node 3 stalls (SIGSTOP) during a burst of 10,000 x 4 KiB messages and a schema change
    os.kill(three.pid, signal.SIGSTOP)
    try:
        sent = one.request({"cmd": "burst", "channel": "burst", "count": MESSAGES, "size": SIZE}, timeout=120)
        assert sent == MESSAGES
        one.request({"cmd": "ds", "method": "add_field", "args": ["events", "kind", "string"]})
    finally:
        os.kill(three.pid, signal.SIGCONT)

    # Then node 2 got every message, in order, and the change
    wait_until(lambda: len(received(two, "burst")) >= MESSAGES, timeout=60, message="node 2 to get the burst")
    assert [m["n"] for m in received(two, "burst")] == list(range(MESSAGES))
    wait_everywhere([two], "events", ["kind"], within=10)

    # And node 3 was disconnected, reconnected by itself and ends equal to the database
    wait_until(lambda: three.request({"cmd": "reconnects"}) >= 1, timeout=30, message="node 3 to reconnect")
    wait_until(lambda: field_names(three, "events") == ["kind"], timeout=10)
    assert in_sync(three)
    assert len(received(three, "burst")) < MESSAGES  # Redis dropped what was queued for it (at most once)
