"""The local tier of a near cache on its own: bounds, expiry, copies, and fills that raced an invalidation."""

from __future__ import annotations

from nocluster.cache.local import MISSING, LocalTier
from tests.helpers import wait_until


def fill(tier: LocalTier, key: str, value: object, ttl: float | None = None) -> bool:
    return tier.finish(tier.begin(key, write=False), value, ttl)


def test_the_least_recently_used_key_goes_first_when_the_tier_is_full() -> None:
    tier = LocalTier(max_entries=3)
    for key in "abc":
        fill(tier, key, key)
    assert tier.get("a") == "a"  # a is now the most recently used
    fill(tier, "d", "d")
    assert tier.keys() == ["c", "a", "d"]
    assert tier.get("b") is MISSING


def test_a_value_leaves_the_tier_when_its_ttl_passes() -> None:
    tier = LocalTier(max_entries=10)
    fill(tier, "short", 1, ttl=0.2)
    fill(tier, "forever", 2, ttl=None)
    wait_until(lambda: tier.get("short") is MISSING, timeout=5, message="the 0.2 s value to expire")
    assert tier.get("forever") == 2
    assert not fill(tier, "gone", 3, ttl=0)


def test_a_caller_mutating_what_it_got_does_not_change_the_tier() -> None:
    tier = LocalTier(max_entries=10)
    fill(tier, "k", {"roles": ["admin"]})
    got = tier.get("k")
    got["roles"].append("root")
    assert tier.get("k") == {"roles": ["admin"]}


def test_a_fill_that_an_invalidation_overtook_is_not_kept() -> None:
    # Given a read of the store in flight (it read the old value)
    tier = LocalTier(max_entries=10)
    ticket = tier.begin("k", write=False)
    # When another node's invalidation of the key arrives before the read is stored
    tier.invalidate(["k"])
    # Then what it read is not kept, and the next read goes to the store
    assert not tier.finish(ticket, "old")
    assert tier.get("k") is MISSING


def test_an_invalidation_of_another_key_does_not_stop_a_fill() -> None:
    tier = LocalTier(max_entries=10)
    ticket = tier.begin("k", write=False)
    tier.invalidate(["other"])
    assert tier.finish(ticket, "v")
    assert tier.get("k") == "v"


def test_a_clear_during_a_fill_drops_the_fill() -> None:
    # A reset, a reconnect or a gap clears the tier: a read in flight from before it is not kept
    tier = LocalTier(max_entries=10)
    ticket = tier.begin("k", write=False)
    tier.clear()
    assert not tier.finish(ticket, "old")
    assert len(tier) == 0


def test_two_writes_of_one_key_in_flight_keep_neither_value() -> None:
    # Given two threads of one node writing the same key: the store may apply them in either order
    tier = LocalTier(max_entries=10)
    fill(tier, "k", "before")
    first = tier.begin("k", write=True)
    assert tier.get("k") is MISSING  # a write drops the old local value at once
    second = tier.begin("k", write=True)
    # Then neither is kept, whichever finishes first
    assert not tier.finish(second, "two")
    assert not tier.finish(first, "one")
    assert tier.get("k") is MISSING
    # And once nothing is in flight, a write is kept again
    assert tier.finish(tier.begin("k", write=True), "three")


def test_a_fill_overlapping_a_write_on_the_same_node_is_not_kept() -> None:
    # Given a write in flight, a read starts (it may see the store before or after the write)
    tier = LocalTier(max_entries=10)
    write = tier.begin("k", write=True)
    read = tier.begin("k", write=False)
    assert not tier.finish(write, "new")  # the write finishes while the read is still in flight
    assert not tier.finish(read, "old")  # and the read finishes last, with what it may have read before
    assert tier.get("k") is MISSING


def test_the_tier_gives_back_what_a_json_round_trip_through_the_store_would() -> None:
    import enum

    class Level(enum.IntEnum):
        HIGH = 3

    tier = LocalTier(max_entries=10)
    fill(tier, "t", {"pair": (1, 2), "level": Level.HIGH})
    fill(tier, "e", Level.HIGH)
    assert tier.get("t") == {"pair": [1, 2], "level": 3}
    assert type(tier.get("t")["level"]) is int
    assert type(tier.get("e")) is int
