"""Near caches in two real node processes on django-redis and a real pub/sub broker (Redis, RabbitMQ)."""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import pytest

from tests.helpers import NodeProcess, stop_nodes, wait_until
from tests.tcpproxy import TcpProxy

SCENARIO = "tests.cache.near_scenario:handle"
ROUNDS = 200


@pytest.fixture
def writer_and_reader(node_env: dict[str, str], broker_url: str) -> Iterator[tuple[NodeProcess, NodeProcess, TcpProxy]]:
    """Node A on the broker, node B reaching the broker through a TCP proxy; both on the same Redis store."""
    proxy = TcpProxy.for_broker(broker_url)
    nodes = [
        NodeProcess(SCENARIO, env={**node_env, "PUBSUB_URL": broker_url}).spawn(),
        NodeProcess(SCENARIO, env={**node_env, "PUBSUB_URL": proxy.url(broker_url)}).spawn(),
    ]
    try:
        for node in nodes:
            node.wait_ready(90)
        for node in nodes:  # create the near cache (and bind its invalidations) on both before anything else
            node.request({"cmd": "get", "key": "warm-up"})
        yield nodes[0], nodes[1], proxy
    finally:
        nodes[0].request({"cmd": "eval", "expr": "app.cache_manager.get('hot').reset()"})
        stop_nodes(nodes)
        proxy.close()


def seen(node: NodeProcess, value: object) -> float:
    """When (the node's monotonic clock) its poller first read ``value``."""
    event = node.wait_event(lambda e: e.get("event") == "seen" and e.get("value") == value, timeout=20)
    return float(event["at"])


@pytest.mark.cluster
def test_a_write_reaches_the_other_nodes_local_tier_within_the_pubsub_latency(
    writer_and_reader: tuple[NodeProcess, NodeProcess, TcpProxy], broker_url: str
) -> None:
    a, b, _ = writer_and_reader
    # Given B polls the key through its near cache, and checks it right after each invalidation is applied
    # (A's first write: its invalidations are numbered from it)
    a.request({"cmd": "set", "key": "n", "value": 0})
    b.request({"cmd": "watch", "key": "n"})
    seen(b, 0)
    # When A writes 1, 2, 3... one at a time
    from_call, from_return = [], []
    for n in range(1, ROUNDS + 1):
        called, returned = a.request({"cmd": "set", "key": "n", "value": n})
        visible = seen(b, n)
        from_call.append(visible - called)
        from_return.append(visible - returned)
    # Then B saw every value, and never the old one once the invalidation had been delivered
    assert b.request({"cmd": "stale"}) == []
    holds(b, "n", ROUNDS)
    broker = broker_url.split(":", 1)[0]
    for label, latencies in (("called", from_call), ("returned", from_return)):
        latencies.sort()
        print(
            f"\nnear cache, {broker} pub/sub, {ROUNDS} writes: A's set {label} -> B's get returns the new value: "
            f"p50 {statistics.median(latencies) * 1e3:.2f} ms, p99 {latencies[int(ROUNDS * 0.99) - 1] * 1e3:.2f} "
            f"ms, max {latencies[-1] * 1e3:.2f} ms"
        )


def holds(node: NodeProcess, key: str, value: object) -> None:
    """Wait until ``node`` reads ``value`` and keeps it in its local tier (a read that an invalidation overtook
    is rightly not kept: read again)."""

    def kept() -> bool:
        return bool(node.request({"cmd": "get", "key": key}) == value == node.request({"cmd": "local", "key": key}))

    wait_until(kept, timeout=10, message=f"the node to hold {value!r} locally")


def state(node: NodeProcess) -> dict[str, int | bool]:
    result: dict[str, int | bool] = node.request({"cmd": "state"})
    return result


@pytest.mark.cluster
def test_after_a_broker_cut_the_other_node_serves_no_stale_value(
    writer_and_reader: tuple[NodeProcess, NodeProcess, TcpProxy],
) -> None:
    a, b, proxy = writer_and_reader
    # Given B holds v0 in its local tier
    a.request({"cmd": "set", "key": "k", "value": "v0"})
    holds(b, "k", "v0")

    # When B's broker connection is cut, A writes v1 (B cannot hear of it), and the connection comes back;
    # B reads nothing meanwhile, so only the reconnect can save it
    before = state(b)["clears"]
    proxy.cut()
    a.request({"cmd": "set", "key": "k", "value": "v1"})
    proxy.restore()
    # Then once B is connected again (reconnected and re-bound: it cleared its tiers), it serves v1, not v0
    wait_until(lambda: state(b)["connected"] and state(b)["clears"] > before, timeout=30, message="B to reconnect")
    assert b.request({"cmd": "get", "key": "k"}) == "v1"
    holds(b, "k", "v1")  # and it is hot again

    # And while B is cut off and knows it, it reads the store rather than its tier
    proxy.cut()
    wait_until(lambda: not state(b)["connected"], timeout=30, message="B to notice the cut")
    a.request({"cmd": "set", "key": "k", "value": "v2"})
    assert b.request({"cmd": "get", "key": "k"}) == "v2"
    assert b.request({"cmd": "local", "key": "k"}) == "<missing>"
    proxy.restore()
    wait_until(lambda: state(b)["connected"], timeout=30, message="B to reconnect")
    assert b.request({"cmd": "get", "key": "k"}) == "v2"
