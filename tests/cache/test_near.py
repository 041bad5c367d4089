"""Near caches (``local=True``) of two in-process nodes on one store, invalidating each other over pub/sub."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.test import override_settings

from nocluster import Application
from nocluster.cache.invalidation import CHANNEL
from nocluster.cache.local import MISSING
from nocluster.cache.near import NearCache
from settings.test import CACHES
from tests.cache.conftest import local_pubsub, redis_store
from tests.cache.roundtrips import CountingConnection, count_round_trips
from tests.helpers import wait_until

Pair = tuple[Application, Application, NearCache, NearCache]


@pytest.fixture
def pair(store: str, app_name: str) -> Iterator[Pair]:
    """Nodes A and B (pub/sub started) and their near cache ``hot`` over ``store``."""
    apps = [Application({"NAME": app_name, "PUBSUB": local_pubsub(app_name)}) for _ in range(2)]
    for node in apps:
        node.pub_sub_manager.start()
    near = [node.cache_manager.create_cache(name="hot", store=store, local=True) for node in apps]
    assert isinstance(near[0], NearCache) and isinstance(near[1], NearCache)
    yield apps[0], apps[1], near[0], near[1]
    near[0].reset()
    for node in apps:
        node.pub_sub_manager.stop()


def delivered(a: Application, b: Application) -> None:
    """Everything A and B published so far has reached the other."""
    assert a.pub_sub_manager.drain(10, peers=[b.pub_sub_manager])


def test_a_write_on_one_node_replaces_the_other_nodes_local_copy(pair: Pair) -> None:
    a, b, on_a, on_b = pair
    # Given B holds the value in its local tier (read after A's invalidation arrived: a read overtaken by it
    # would rightly not be kept)
    on_a.set("flags", {"beta": False})
    delivered(a, b)
    assert on_b.get("flags") == {"beta": False}
    assert on_b.tier.get("flags") == {"beta": False}
    # When A writes the key and its invalidation has been delivered
    on_a.set("flags", {"beta": True})
    delivered(a, b)
    # Then B's tier no longer has the old value, and B reads the new one
    assert on_b.tier.get("flags") is MISSING
    assert on_b.get("flags") == {"beta": True}
    # And the writer kept its own fresh value locally
    assert on_a.tier.get("flags") == {"beta": True}


@pytest.mark.parametrize("write", ["delete", "mdel", "mset", "reset", "set_ttl_0"])
def test_every_kind_of_write_invalidates_the_other_node(pair: Pair, write: str) -> None:
    a, b, on_a, on_b = pair
    on_a.mset({"x": 1, "y": 2})
    delivered(a, b)
    assert on_b.mget("x", "y") == [1, 2]
    assert on_b.tier.keys() == ["x", "y"]
    if write == "delete":
        on_a.delete("x")
    elif write == "mdel":
        on_a.mdel("x", "y")
    elif write == "mset":
        on_a.mset({"x": 10, "y": 20})
    elif write == "reset":
        on_a.reset()
    else:
        on_a.set("x", 10, ttl=0)
    delivered(a, b)
    assert on_b.tier.get("x") is MISSING
    assert on_b.get("x") == {"mset": 10}.get(write)


def test_a_hot_key_is_read_without_a_round_trip(redis_url: str, app_name: str) -> None:
    separator = "&" if "?" in redis_url else "?"
    counted = redis_store(f"{redis_url}{separator}health_check_interval=0", connection_class=CountingConnection)
    with override_settings(CACHES={**CACHES, "counted": counted}):
        node = Application({"NAME": app_name, "PUBSUB": local_pubsub(app_name)})
        node.pub_sub_manager.start()
        try:
            near = node.cache_manager.create_cache(name="hot", store="counted", local=True)
            near.set("k", {"v": 1})
            with count_round_trips() as sent:
                for _ in range(100):
                    assert near.get("k") == {"v": 1}
                assert near.wrap("k", lambda: {"v": "not called"}) == {"v": 1}
                assert near.mget("k") == [{"v": 1}]
            assert sent == []
            # A cold key costs one round trip (the value and its ttl together), then none
            near.store.delete(near.full_key("k"))
            near.tier.clear()
            with count_round_trips() as sent:
                assert near.get("k") is None
            assert len(sent) == 1
            near.reset()
        finally:
            node.pub_sub_manager.stop()


def test_a_node_that_is_not_listening_reads_the_store_every_time(pair: Pair) -> None:
    _, b, on_a, on_b = pair
    # Given B has a value locally, then its pub/sub consumer stops
    on_a.set("k", "old")
    assert on_b.get("k") == "old"
    b.pub_sub_manager.stop()
    # When A writes (B cannot hear of it)
    on_a.set("k", "new")
    # Then B reads the store, and its tier is empty
    assert on_b.get("k") == "new"
    assert on_b.tier.keys() == []
    assert on_b.mget("k") == ["new"]


def test_a_gap_in_the_invalidations_clears_every_local_tier(pair: Pair) -> None:
    a, b, on_a, on_b = pair
    other = b.cache_manager.create_cache(name="other", store=on_b.store_alias, local=True)
    on_a.set("k", 1)
    other.set("o", 2)
    delivered(a, b)
    assert on_b.get("k") == 1 and other.tier.keys() == ["o"]
    # When B receives invalidations 1 and 3 of some node (it missed 2)
    source = "f" * 32
    for seq in (1, 3):
        a.pub_sub_manager.publish(CHANNEL, {"seq": seq, "source": source, "cache": "unrelated", "keys": ["z"]})
    delivered(a, b)
    # Then every near cache of B forgot everything
    assert on_b.tier.keys() == [] and other.tier.keys() == []
    other.reset()


def test_a_malformed_invalidation_is_logged_and_dropped(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    a, b, on_a, on_b = pair
    with caplog.at_level(logging.ERROR, logger="nocluster.cache"):
        a.pub_sub_manager.publish(CHANNEL, {"seq": 1, "source": "x" * 32, "cache": "hot", "keys": "k"})
        delivered(a, b)
    assert "field 'keys' must be a list of str or null" in caplog.text
    on_a.set("k", 1)
    delivered(a, b)
    assert on_b.get("k") == 1


def test_a_value_read_from_the_store_leaves_the_local_tier_with_its_ttl(pair: Pair) -> None:
    a, b, on_a, on_b = pair
    on_a.set("k", "v", ttl=0.5)
    delivered(a, b)
    assert on_b.get("k") == "v"
    assert on_b.tier.get("k") == "v"
    # B read the store's remaining ttl: its copy goes when the store's does (a tier ignoring it would keep "v")
    wait_until(lambda: on_b.get("k") is None, timeout=5, message="B's copy to expire with the store's")


def test_the_local_tier_is_bounded(store: str, app_name: str) -> None:
    node = Application({"NAME": app_name, "PUBSUB": local_pubsub(app_name)})
    node.pub_sub_manager.start()
    try:
        near = node.cache_manager.create_cache(name="small", store=store, local=True, local_max_entries=3)
        near.mset({f"k{i}": i for i in range(5)})
        assert [near.get(f"k{i}") for i in range(5)] == list(range(5))
        assert near.tier.keys() == ["k2", "k3", "k4"]
        near.reset()
    finally:
        node.pub_sub_manager.stop()


@pytest.mark.django_db(transaction=True)
def test_a_write_inside_atomic_is_immediate_and_so_is_its_invalidation(pair: Pair) -> None:
    # Cache writes do not wait for the commit (the store write does not); the invalidation goes with the write
    a, b, on_a, on_b = pair
    on_a.set("k", "old")
    assert on_b.get("k") == "old"
    with transaction.atomic():
        on_a.set("k", "new")
        delivered(a, b)
        assert on_b.get("k") == "new"


def test_one_readers_values_never_go_back_while_another_node_writes(pair: Pair) -> None:
    # Given node A writing 1..200 to one key while a thread of node B reads it without pause
    a, b, on_a, on_b = pair
    on_a.set("n", 0)
    seen: list[int] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.append(on_b.get("n"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(1, 201):
            on_a.set("n", n)
    finally:
        delivered(a, b)
        done.set()
        reader.join(10)
    # Then B never went back to an older value, and ends on the last one
    assert all(earlier <= later for earlier, later in itertools.pairwise(seen))
    assert on_b.get("n") == 200


def test_create_cache_checks_the_local_arguments(store: str, app_name: str, tmp_path: object) -> None:
    manager = Application({"NAME": app_name, "PUBSUB": local_pubsub(app_name)}).cache_manager
    manager.create_cache(name="n", store=store, local=True)
    with pytest.raises(ValueError, match=r"cache 'n' exists with .*local=True, local_max_entries=1000"):
        manager.create_cache(name="n", store=store)
    with pytest.raises(ValueError, match="local_max_entries must be between 1"):
        manager.create_cache(name="m", store=store, local=True, local_max_entries=0)
    with pytest.raises(TypeError, match="local must be a bool"):
        manager.create_cache(name="m", store=store, local=1)  # type: ignore[arg-type]
    files = {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(tmp_path)}
    with (
        override_settings(CACHES={**CACHES, "files": files}),
        pytest.raises(ImproperlyConfigured, match="store 'files' cannot tell a key's time to live"),
    ):
        manager.create_cache(name="f", store="files", local=True)
