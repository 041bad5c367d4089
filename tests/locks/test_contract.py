"""The lock contract, run on every backend (local, Redis): NocoBase's lock-manager scenarios and ours.

Holders are threads of this process; the cross-process cases are in ``test_redis.py``. Short sleeps below only
widen the window in which a broken lock would let a second holder in; no test asserts an upper time bound.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from nocluster import Application, BackendUnavailable, LockAcquireError, LockNotOwned
from nocluster.locks import LockManager
from tests.helpers import wait_until
from tests.locks.conftest import delete_lock_keys


def wait_for_a_waiter(locks: LockManager, key: str = "test") -> None:
    """Until someone is blocked waiting for ``key`` (a broken lock would have let it in instead)."""
    wait_until(lambda: (info := locks.get_lock(key)) is not None and info.waiting >= 1, message="a blocked waiter")


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="lock-test") as executor:
        yield executor


def test_acquire_blocks_until_the_holder_releases(locks: LockManager, pool: ThreadPoolExecutor) -> None:
    # Given a holder that releases only after a waiter has started waiting (NocoBase: "acquire and release")
    order: list[int] = []
    first = locks.acquire("test", ttl=10)
    order.append(1)
    waiting = threading.Event()

    def release_later() -> None:
        waiting.wait(10)
        wait_for_a_waiter(locks)
        order.append(2)
        first.release()

    releaser = pool.submit(release_later)
    order.append(4)
    waiting.set()
    # When a second caller acquires the same key
    second = locks.acquire("test", ttl=10, timeout=30)
    order.append(5)
    second.release()
    order.append(6)
    releaser.result(10)
    # Then it got the lock only after the first holder released it (long before the 10 s ttl)
    assert order == [1, 4, 2, 5, 6]
    assert second.token > first.token


def test_an_expired_ttl_lets_the_waiter_in_before_the_holder_releases(locks: LockManager) -> None:
    # Given a holder with a 0.3 s ttl that never releases in time
    started = time.monotonic()
    first = locks.acquire("test", ttl=0.3)
    # When another caller waits for the key
    second = locks.acquire("test", ttl=10, timeout=30)
    # Then it gets the lock after the ttl, while the first holder still thinks it holds it
    assert time.monotonic() - started >= 0.29
    assert second.token > first.token
    # And the old holder's late release raises and leaves the new holder's lock alone
    with pytest.raises(LockNotOwned, match="'test'"):
        first.release()
    assert locks.get_lock("test").token == second.token
    with pytest.raises(LockAcquireError):
        locks.try_acquire("test")
    second.release()
    assert locks.get_lock("test") is None


def test_run_exclusive_runs_one_at_a_time_in_order(locks: LockManager, pool: ThreadPoolExecutor) -> None:
    # Given one run_exclusive holding the key until a second one is waiting (NocoBase: "runExclusive")
    order: list[str] = []
    second_started = threading.Event()

    def first() -> str:
        order.append("first:start")
        second_started.wait(10)
        wait_for_a_waiter(locks)
        order.append("first:end")
        return "first"

    def second() -> str:
        order.append("second:start")
        order.append("second:end")
        return "second"

    running = pool.submit(locks.run_exclusive, "test", first, 10)
    wait_until(lambda: order, message="first run_exclusive started")
    waiting = pool.submit(lambda: (second_started.set(), locks.run_exclusive("test", second, 10))[1])
    # Then the second runs only after the first returned, and each returns its fn's value
    assert running.result(30) == "first"
    assert waiting.result(30) == "second"
    assert order == ["first:start", "first:end", "second:start", "second:end"]


def test_run_exclusive_past_its_ttl_lets_the_next_in_and_reports_the_loss(
    locks: LockManager, pool: ThreadPoolExecutor
) -> None:
    # Given a run_exclusive whose fn outlives its 0.3 s ttl (NocoBase: "runExclusive with timeout")
    order: list[str] = []
    second_done = threading.Event()

    def first() -> None:
        order.append("first:start")
        second_done.wait(30)
        order.append("first:end")

    def second() -> str:
        order.append("second:start")
        second_done.set()
        return "second"

    running: Future[None] = pool.submit(locks.run_exclusive, "test", first, 0.3)
    wait_until(lambda: order, message="first run_exclusive started")
    # When a second run_exclusive waits for the key
    assert locks.run_exclusive("test", second, ttl=10, timeout=30) == "second"
    # Then it ran after the ttl, inside the first fn, and the first learns it lost the lock
    with pytest.raises(LockNotOwned, match="'test'"):
        running.result(30)
    assert order == ["first:start", "second:start", "first:end"]
    assert locks.get_lock("test") is None


def test_try_acquire_fails_while_held_and_succeeds_after_release(locks: LockManager) -> None:
    held = locks.acquire("test", ttl=10)
    with pytest.raises(LockAcquireError, match=r"'test'.*held by instance"):
        locks.try_acquire("test")
    held.release()
    again = locks.try_acquire("test", ttl=10)
    assert again.token > held.token
    again.release()


def test_two_racing_try_acquire_calls_give_exactly_one_winner(locks: LockManager, pool: ThreadPoolExecutor) -> None:
    for round_ in range(10):
        # Given two callers released at the same instant
        start, done = threading.Barrier(2, timeout=10), threading.Barrier(2, timeout=10)

        def contender(
            start: threading.Barrier = start, done: threading.Barrier = done, key: str = f"race-{round_}"
        ) -> str:
            start.wait()
            try:
                lock = locks.try_acquire(key, ttl=10)
            except LockAcquireError:
                done.wait()
                return "skipped"
            done.wait()  # hold until the other one has tried
            lock.release()
            return "acquired"

        results = sorted(f.result(30) for f in [pool.submit(contender), pool.submit(contender)])
        # Then exactly one wins
        assert results == ["acquired", "skipped"], f"round {round_}"


def test_try_acquire_with_a_timeout_waits_for_the_release(locks: LockManager, pool: ThreadPoolExecutor) -> None:
    held = locks.acquire("test", ttl=10)
    releaser = pool.submit(lambda: (wait_for_a_waiter(locks), held.release()))
    lock = locks.try_acquire("test", ttl=10, timeout=30)
    releaser.result(10)
    lock.release()


def test_try_acquire_gives_up_when_the_timeout_passes(locks: LockManager) -> None:
    held = locks.acquire("test", ttl=10)
    started = time.monotonic()
    with pytest.raises(LockAcquireError, match=r"'test' not acquired within 0\.2 s"):
        locks.try_acquire("test", timeout=0.2)
    assert time.monotonic() - started >= 0.19
    held.release()


def test_a_lock_is_released_when_fn_raises(locks: LockManager) -> None:
    def broken() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        locks.run_exclusive("test", broken, ttl=10)
    assert locks.get_lock("test") is None
    locks.try_acquire("test").release()


def test_the_context_manager_holds_and_releases(locks: LockManager) -> None:
    with locks.acquire("test", ttl=10) as lock:
        assert locks.get_lock("test").token == lock.token
        with pytest.raises(LockAcquireError):
            locks.try_acquire("test")
    assert lock.released and locks.get_lock("test") is None
    # An explicit release inside the block is fine (NocoBase: "release() abandons the pre-acquired lock")
    with locks.try_acquire("test", ttl=10) as lock:
        lock.release()
    locks.try_acquire("test").release()


def test_a_lost_lock_does_not_hide_the_exception_of_the_block(locks: LockManager) -> None:
    with pytest.raises(KeyError), locks.acquire("test", ttl=0.05) as lock:
        wait_until(lambda: locks.get_lock("test") is None, message="ttl expiry")
        raise KeyError("from the block")
    assert lock.lost


def test_fencing_tokens_increase_with_every_acquisition(locks: LockManager) -> None:
    tokens = []
    for _ in range(5):
        with locks.acquire("test", ttl=10) as lock:
            tokens.append(lock.token)
    other = locks.acquire("other", ttl=10)
    assert tokens == sorted(set(tokens)) and len(tokens) == 5
    assert other.token >= 1
    other.release()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: m.acquire(""), ValueError, "non-empty str"),
        (lambda m: m.acquire(None), ValueError, "non-empty str"),  # type: ignore[arg-type]
        (lambda m: m.acquire("k", ttl=0), ValueError, r"'k'.*ttl must be > 0"),
        (lambda m: m.acquire("k", ttl=-1), ValueError, r"'k'.*ttl must be > 0"),
        (lambda m: m.acquire("k", ttl="1"), TypeError, r"'k'.*ttl must be a number"),  # type: ignore[arg-type]
        (lambda m: m.try_acquire("k", timeout=-1), ValueError, r"'k'.*timeout must be >= 0"),
        (lambda m: m.acquire("k", ttl=float("nan")), ValueError, r"'k'.*ttl must be a finite number"),
        (lambda m: m.acquire("k", ttl=float("inf")), ValueError, r"'k'.*ttl must be a finite number"),
        (lambda m: m.acquire("k", ttl=2e9), ValueError, r"'k'.*ttl must be at most 1e\+09 seconds"),
        (lambda m: m.acquire("k", timeout=float("nan")), ValueError, r"'k'.*timeout must be a finite number"),
        (lambda m: m.run_exclusive("k", "not callable"), TypeError, r"'k'.*fn must be callable"),  # type: ignore
        (lambda m: m.get_lock(""), ValueError, "non-empty str"),
    ],
)
def test_bad_input_gets_a_clear_error(locks: LockManager, call: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call(locks)  # type: ignore[operator]
    assert locks.list_locks() == []


def test_locks_are_namespaced_by_app_name(lock_app: Application, locks: LockManager) -> None:
    lock = locks.acquire("shared", ttl=10)
    assert lock.name == f"{lock_app.name}:lock:shared"
    other = Application({"NAME": f"{lock_app.name}x", "LOCKS": lock_app.config["LOCKS"]})
    try:
        other.lock_manager.try_acquire("shared").release()  # another app: another lock
    finally:
        other.lock_manager.close()
        lock.release()
        if "url" in lock_app.config["LOCKS"]["OPTIONS"]:
            delete_lock_keys(lock_app.config["LOCKS"]["OPTIONS"]["url"], other.name)


def test_inspection_lists_shows_and_force_releases(lock_app: Application, locks: LockManager) -> None:
    # Given two held locks
    a = locks.acquire("jobs:a", ttl=10)
    b = locks.acquire("other", ttl=5)
    # Then they are listed with their holder, token and time left, and a pattern filters them
    listed = {info.key: info for info in locks.list_locks()}
    assert set(listed) == {"jobs:a", "other"}
    assert listed["jobs:a"].instance_id == lock_app.instance_id
    assert listed["jobs:a"].token == a.token and listed["other"].token == b.token
    assert 0 < listed["other"].time_left <= 5
    assert [info.key for info in locks.list_locks("jobs:*")] == ["jobs:a"]
    assert locks.get_lock("jobs:a").name == f"{lock_app.name}:lock:jobs:a"
    # When one is force-released
    assert locks.force_release("jobs:a") is True
    assert locks.force_release("jobs:a") is False
    # Then another holder gets it at once, and the old holder's release raises without touching it
    c = locks.try_acquire("jobs:a", ttl=10)
    with pytest.raises(LockNotOwned):
        a.release()
    assert locks.get_lock("jobs:a").token == c.token
    c.release()
    b.release()
    assert locks.list_locks() == []


def test_auto_renewal_keeps_the_lock_past_its_ttl(locks: LockManager) -> None:
    # Given a lock with a 0.6 s ttl and auto-renewal (every 0.2 s)
    renewals: list[float] = []
    extend = locks.backend.extend

    def counted_extend(lease: Any, ttl: float) -> bool:  # the real backend's extend, counted
        renewals.append(ttl)
        return extend(lease, ttl)

    locks.backend.extend = counted_extend  # type: ignore[method-assign]
    lock = locks.acquire("test", ttl=0.6, auto_renew=True)
    renewer = next(t for t in threading.enumerate() if t.name == f"lock-renewal:{lock.key}")
    # When the work lasts several ttls: five renewals of 0.6 s, about 1 s
    wait_until(lambda: len(renewals) >= 5, timeout=10, message="five renewals")
    # Then it is still held, and the release stops and joins the renewal thread
    with pytest.raises(LockAcquireError):
        locks.try_acquire("test")
    assert not lock.lost
    lock.release()
    assert not renewer.is_alive()


def test_auto_renewal_marks_a_lost_lock_lost(locks: LockManager) -> None:
    # Given a renewed lock that an operator force-releases
    lock = locks.acquire("test", ttl=0.3, auto_renew=True)
    locks.force_release("test")
    # Then the renewal finds out, marks it lost and stops, and the release raises
    wait_until(lambda: lock.lost, timeout=10, message="renewal noticing the loss")
    with pytest.raises(LockNotOwned, match="renewal found it taken"):
        lock.raise_if_lost()
    with pytest.raises(LockNotOwned):
        lock.release()


def test_a_release_that_cannot_reach_the_backend_can_be_tried_again(locks: LockManager) -> None:
    # Given a held lock whose first release fails on the way to the backend
    lock = locks.acquire("flaky-release", ttl=10)
    real_release = locks.backend.release
    calls: list[int] = []

    def unreachable_once(lease: object) -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise BackendUnavailable("lock 'flaky-release': unreachable")
        return real_release(lease)  # type: ignore[arg-type]

    locks.backend.release = unreachable_once  # type: ignore[method-assign]
    try:
        with pytest.raises(BackendUnavailable):
            lock.release()
        # Then the handle still counts as held, and a second release frees the lock
        assert not lock.released and locks.get_lock("flaky-release") is not None
        lock.release()
        assert lock.released and locks.get_lock("flaky-release") is None
    finally:
        del locks.backend.release


def test_a_dropped_auto_renewed_handle_stops_renewing_and_the_ttl_frees_the_lock(locks: LockManager) -> None:
    import gc

    locks.acquire("dropped", ttl=0.3, auto_renew=True)  # the handle is not kept
    gc.collect()
    wait_until(lambda: locks.get_lock("dropped") is None, timeout=5, message="the ttl to free a dropped lock")


def test_renewal_that_keeps_failing_marks_the_lock_lost(locks: LockManager) -> None:
    # Given an auto-renewed lock whose backend starts failing with an unexpected error
    lock = locks.acquire("renew-errors", ttl=0.3, auto_renew=True)

    def broken_extend(lease: object, ttl: float) -> bool:
        raise RuntimeError("READONLY You can't write against a read only replica")

    locks.backend.extend = broken_extend  # type: ignore[method-assign]
    try:
        # Then the renewal does not die silently: the holder learns it lost the lock
        wait_until(lambda: lock.lost, timeout=5, message="the lock to be marked lost")
        with pytest.raises(LockNotOwned, match="renewal failed"):
            lock.raise_if_lost()
    finally:
        del locks.backend.extend


def test_force_release_with_a_token_frees_only_that_holder(locks: LockManager) -> None:
    old = locks.acquire("by-token", ttl=10)
    assert locks.force_release("by-token", token=old.token + 1) is False
    assert locks.get_lock("by-token").token == old.token
    assert locks.force_release("by-token", token=old.token) is True
    assert locks.get_lock("by-token") is None


def waiting_for(locks: LockManager, key: str) -> int | None:
    info = locks.get_lock(key)
    return None if info is None else info.waiting


def test_a_waiter_counts_while_it_waits_and_stops_when_it_gets_the_lock_or_gives_up(
    locks: LockManager, pool: ThreadPoolExecutor
) -> None:
    # Given a holder and nobody waiting
    held = locks.acquire("test", ttl=30)
    assert waiting_for(locks, "test") == 0
    # When two callers block in acquire: one that will get the lock, one that gives up after its timeout
    patient = pool.submit(locks.acquire, "test", 10, 30)
    wait_until(lambda: waiting_for(locks, "test") == 1, message="the patient waiter counted")
    quitter = pool.submit(locks.acquire, "test", 10, 1.0)
    # Then both count, in list_locks as in get_lock
    wait_until(lambda: waiting_for(locks, "test") == 2, message="both waiters counted")
    assert [info.waiting for info in locks.list_locks("test")] == [2]
    # And the one that gives up stops counting
    with pytest.raises(LockAcquireError):
        quitter.result(30)
    assert waiting_for(locks, "test") == 1
    # And the one that gets the lock stops counting too: it holds it, nobody waits
    held.release()
    lock = patient.result(30)
    assert waiting_for(locks, "test") == 0
    lock.release()
