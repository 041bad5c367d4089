"""Three real node processes on kombu, over Redis and over RabbitMQ: pub/sub semantics, data_source_main sync,
and the fault cases (one node cut off, every node cut off), with each node behind its own TCP proxy.

One set of nodes per broker serves every check, to keep the wall time low.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import NodeProcess, stop_nodes, wait_until
from tests.tcpproxy import TcpProxy

SCENARIO = "tests.pubsub.scenario:handle"


@contextlib.contextmanager
def nodes_behind_proxies(
    node_env: dict[str, str], broker_url: str, count: int
) -> Iterator[tuple[list[NodeProcess], list[TcpProxy]]]:
    """``count`` scenario nodes, each reaching the pub/sub broker through a TCP proxy of its own."""
    proxies = [TcpProxy.for_broker(broker_url) for _ in range(count)]
    nodes = [NodeProcess(SCENARIO, env={**node_env, "PUBSUB_URL": proxy.url(broker_url)}).spawn() for proxy in proxies]
    try:
        for node in nodes:
            node.wait_ready(90)
        yield nodes, proxies
    finally:
        stop_nodes(nodes)
        for proxy in proxies:
            proxy.close()


@pytest.fixture
def proxied_nodes(node_env: dict[str, str], broker_url: str) -> Iterator[tuple[list[NodeProcess], list[TcpProxy]]]:
    with nodes_behind_proxies(node_env, broker_url, 3) as made:
        yield made


def received(node: NodeProcess, key: str) -> list[Any]:
    return node.request({"cmd": "received", "key": key})


def barrier(nodes: list[NodeProcess], sender: NodeProcess, tag: str) -> None:
    """Every node has received everything ``sender`` published before this (one publisher's order holds)."""
    for node in nodes:
        node.request({"cmd": "subscribe", "channel": "barrier", "key": f"barrier-{tag}"})
    sender.request({"cmd": "publish", "channel": "barrier", "message": tag, "skip_self": False})
    for node in nodes:
        wait_until(lambda node=node: tag in received(node, f"barrier-{tag}"), timeout=20, message=f"barrier {tag}")


def field_names(node: NodeProcess, collection: str) -> list[str] | None:
    state = node.request({"cmd": "ds_state"})
    schema = state["registry"].get(collection)
    return None if schema is None else sorted(schema["fields"])


def in_sync(node: NodeProcess) -> bool:
    state = node.request({"cmd": "ds_state"})
    return state["registry"] == state["database"]


def wait_everywhere(nodes: list[NodeProcess], collection: str, fields: list[str] | None, within: float) -> float:
    """Wait until every node's registry shows ``fields`` for ``collection``; return the seconds it took."""
    started = time.monotonic()
    for node in nodes:
        remaining = max(0.05, within - (time.monotonic() - started))
        wait_until(lambda node=node: field_names(node, collection) == fields, timeout=remaining, interval=0.02)
    return time.monotonic() - started


def check_pubsub_semantics(nodes: list[NodeProcess]) -> None:
    one, two, three = nodes
    for node in nodes:
        node.request({"cmd": "subscribe", "channel": "news", "key": "news"})
        node.request({"cmd": "subscribe", "channel": "deb", "key": "deb", "debounce": 0.3})
    two.request({"cmd": "subscribe", "channel": "fragile", "key": "fragile", "fail_on": "boom"})

    # skip_self: the two others get it, the publisher does not; 200 messages from one publisher stay in order
    for n in range(200):
        one.request({"cmd": "publish", "channel": "news", "message": n})
    for node in (two, three):
        wait_until(lambda node=node: len(received(node, "news")) == 200, timeout=30)
        assert received(node, "news") == list(range(200))
    # only_self: the publisher alone
    one.request({"cmd": "publish", "channel": "news", "message": "me", "only_self": True})
    # debounce: 50 equal messages make one call, a different content its own call
    for _ in range(50):
        one.request({"cmd": "publish", "channel": "deb", "message": {"reload": "a"}})
        one.request({"cmd": "publish", "channel": "deb", "message": {"reload": "b"}})
    # a callback that raises does not stop later deliveries
    one.request({"cmd": "publish", "channel": "fragile", "message": "boom"})
    one.request({"cmd": "publish", "channel": "fragile", "message": "fine"})
    barrier(nodes, one, "semantics")
    assert received(one, "news") == ["me"]
    for node in (two, three):
        assert received(node, "news") == list(range(200))
        wait_until(lambda node=node: len(received(node, "deb")) == 2, timeout=10)
        assert sorted(m["reload"] for m in received(node, "deb")) == ["a", "b"]
    assert received(two, "fragile") == ["boom", "fine"]
    assert "raised on channel 'fragile'" in two.log_text()

    # unsubscribe stops delivery
    three.request({"cmd": "unsubscribe", "channel": "news", "key": "news"})
    one.request({"cmd": "publish", "channel": "news", "message": "after unsubscribe"})
    barrier(nodes, one, "unsubscribed")
    assert received(two, "news")[-1] == "after unsubscribe"
    assert "after unsubscribe" not in received(three, "news")


def check_data_source_sync(nodes: list[NodeProcess]) -> None:
    one, two, three = nodes
    one.request({"cmd": "ds", "method": "create_collection", "args": ["posts"], "kwargs": {"title": "Posts"}})
    wait_everywhere(nodes, "posts", [], within=10)

    # Within a second of each change on node 1, nodes 2 and 3 have it in their registries
    one.request({"cmd": "ds", "method": "add_field", "args": ["posts", "title", "string"]})
    assert wait_everywhere([two, three], "posts", ["title"], within=1.0) <= 1.0
    one.request({"cmd": "ds", "method": "change_field", "args": ["posts", "title"], "kwargs": {"new_name": "headline"}})
    assert wait_everywhere([two, three], "posts", ["headline"], within=1.0) <= 1.0
    one.request({"cmd": "ds", "method": "add_field", "args": ["posts", "body", "text"]})
    wait_everywhere(nodes, "posts", ["body", "headline"], within=10)
    one.request({"cmd": "ds", "method": "remove_field", "args": ["posts", "body"]})
    assert wait_everywhere([two, three], "posts", ["headline"], within=1.0) <= 1.0
    assert all(in_sync(node) for node in nodes)


def check_faults(nodes: list[NodeProcess], proxies: list[TcpProxy]) -> None:
    one, two, three = nodes
    # Node 3 is cut off while a field is added on node 1
    proxies[2].cut()
    one.request({"cmd": "ds", "method": "add_field", "args": ["posts", "summary", "text"]})
    wait_everywhere([two], "posts", ["headline", "summary"], within=10)
    proxies[2].restore()
    # It reconnects by itself and ends equal to the database (the resync)
    wait_until(lambda: three.request({"cmd": "reconnects"}) >= 1, timeout=30, message="node 3 to reconnect")
    wait_until(lambda: field_names(three, "posts") == ["headline", "summary"], timeout=10)
    assert in_sync(three)

    # Every node is cut off at once (as in a broker restart), then the broker is back
    before = [node.request({"cmd": "reconnects"}) for node in nodes]
    for proxy in proxies:
        proxy.cut()
    for proxy in proxies:
        proxy.restore()
    for node, count in zip(nodes, before, strict=True):
        wait_until(lambda node=node, count=count: node.request({"cmd": "reconnects"}) > count, timeout=30)
    # Each node receives what the others publish afterwards
    for node in nodes:
        node.request({"cmd": "subscribe", "channel": "after", "key": "after"})
    for index, node in enumerate(nodes):
        node.request({"cmd": "publish", "channel": "after", "message": index})
    for index, node in enumerate(nodes):
        expected = sorted(i for i in range(3) if i != index)
        wait_until(lambda node=node, expected=expected: sorted(received(node, "after")) == expected, timeout=20)


@pytest.mark.cluster
def test_three_nodes_broadcast_sync_and_recover(proxied_nodes: tuple[list[NodeProcess], list[TcpProxy]]) -> None:
    nodes, proxies = proxied_nodes
    check_pubsub_semantics(nodes)
    check_data_source_sync(nodes)
    check_faults(nodes, proxies)
