"""Behaviour only the Redis backend has: several processes, kill -9, the wire format, the socket timeout.

Node processes get ``REDIS_URL`` from ``node_env``, so their ``app.lock_manager`` is the Redis backend, and
the same ``app.name`` as this test's ``redis_app``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from django.db import connection

from nocluster import Application, BackendUnavailable, LockAcquireError, LockNotOwned
from nocluster.locks.backends.redis import WAIT_CHUNK, Acquisition, RedisLockBackend
from nocluster.locks.backends.redis_scripts import LockScripts
from nocluster.locks.lock import Lock
from settings.test import RUN_ID
from tests.helpers import ROOT, NodeProcess, start_nodes, stop_nodes, wait_until
from tests.locks.conftest import delete_lock_keys, redis_locks

SCENARIO = "tests.locks.scenarios:handle"
NODES, INCREMENTS = 4, 250

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster_env(node_env: dict[str, str], redis_url: str, app_name: str) -> Iterator[dict[str, str]]:
    yield node_env
    delete_lock_keys(redis_url, app_name)


@pytest.fixture
def counter_table(test_database_url: str, app_name: str) -> Iterator[str]:
    """A one-row counter table of this test in the test database (committed, so node processes see it)."""
    table = "locks_counter_" + re.sub(r"[^a-z0-9]", "_", app_name.lower())
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, value integer NOT NULL)")
        cursor.execute(f"INSERT INTO {table} (id, value) VALUES (1, 0)")
    yield table
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {table}")


def counter(table: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT value FROM {table} WHERE id = 1")
        return int(cursor.fetchone()[0])


def increment_on_every_node(env: dict[str, str], table: str, locked: bool) -> list[list[list[Any]]]:
    nodes = start_nodes(NODES, env, scenario=SCENARIO, start=False)
    try:
        assert {node.request({"cmd": "hold", "key": "probe", "ttl": 0.01})["backend"] for node in nodes} == {
            "RedisLockBackend"
        }
        command = {
            "cmd": "increment",
            "table": table,
            "count": INCREMENTS,
            "key": "counter",
            "locked": locked,
            "pause": 0.001,
            "start_at": time.time() + 1.0,  # every node starts at the same instant
        }
        with ThreadPoolExecutor(max_workers=NODES) as pool:
            return list(pool.map(lambda node: node.request(command, timeout=180), nodes))
    finally:
        stop_nodes(nodes)


def test_four_nodes_incrementing_under_run_exclusive_lose_no_update(cluster_env: dict[str, str], counter_table: str):
    # When 4 node processes each do 250 read-sleep-write increments of one row under the lock
    results = increment_on_every_node(cluster_env, counter_table, locked=True)
    # Then the row ends at exactly 1000
    assert counter(counter_table) == NODES * INCREMENTS
    # And every increment read a distinct value, and in that order the tokens strictly increase across processes
    steps = sorted((value, token, node) for node, rows in enumerate(results) for value, token in rows)
    assert [value for value, _, _ in steps] == list(range(NODES * INCREMENTS))
    tokens = [token for _, token, _ in steps]
    assert all(a < b for a, b in itertools.pairwise(tokens))
    assert [len(rows) for rows in results] == [INCREMENTS] * NODES


def test_four_nodes_incrementing_without_the_lock_lose_updates(cluster_env: dict[str, str], counter_table: str):
    # The same work without the lock: shows the test above can fail
    increment_on_every_node(cluster_env, counter_table, locked=False)
    assert counter(counter_table) < NODES * INCREMENTS


def test_a_killed_holder_frees_the_lock_after_its_ttl(cluster_env: dict[str, str], redis_app: Application) -> None:
    # Given a node process holding a lock with a 3 s ttl, and a waiter in this process
    node = NodeProcess(SCENARIO, env=cluster_env, start=False).spawn().wait_ready()
    try:
        held = node.request({"cmd": "hold", "key": "job", "ttl": 3.0})
        got: dict[str, Any] = {}
        waiter = threading.Thread(
            target=lambda: got.update(lock=redis_app.lock_manager.acquire("job", ttl=10, timeout=30)),
            name="lock-waiter",
        )
        waiter.start()
        # When the holder is killed with SIGKILL (it never releases)
        node.kill()
        killed_at = time.monotonic()
        left = redis_app.lock_manager.get_lock("job").time_left
        assert redis_app.lock_manager.get_lock("job").instance_id == held["instance_id"]
        waiter.join(30)
        # Then the waiter gets the lock once the ttl has run out, with a higher token
        assert "lock" in got
        assert time.monotonic() - killed_at >= left - 0.05
        assert got["lock"].token > held["token"]
        got["lock"].release()
    finally:
        node.stop()


def test_tokens_increase_across_processes(cluster_env: dict[str, str], redis_app: Application) -> None:
    # Given two node processes and this process taking turns on one key
    nodes = start_nodes(2, cluster_env, scenario=SCENARIO, start=False)
    take = "(lambda lock: (lock.release(), lock.token)[1])(app.lock_manager.acquire('shared', ttl=5, timeout=10))"
    try:
        tokens = []
        for _ in range(3):
            for node in nodes:
                tokens.append(node.request({"cmd": "eval", "expr": take}))
                with redis_app.lock_manager.acquire("shared", ttl=5, timeout=10) as lock:
                    tokens.append(lock.token)
        # Then every grant, whichever process got it, has a higher token than the one before
        assert tokens == sorted(set(tokens)) and len(tokens) == 12
    finally:
        stop_nodes(nodes)


def test_the_lock_is_stored_with_a_millisecond_ttl_holder_and_token(redis_app: Application, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    name = f"{redis_app.name}:lock:job"
    # When a lock is taken with a sub-second ttl
    lock = redis_app.lock_manager.acquire("job", ttl=0.25)
    # Then Redis holds it for 250 ms (python-redis-lock alone would make it int(0.25) == 0 s)
    assert 0 < client.pttl(name) <= 250
    instance_id, _nonce, token = client.get(name).split(":")
    assert (instance_id, int(token)) == (redis_app.instance_id, lock.token)
    assert int(client.get(f"{redis_app.name}:lock-tokens")) == lock.token
    # And a release with nobody waiting deletes it and leaves no other key behind
    lock.release()
    assert client.keys(f"*{name}*") == []
    client.close()


def queue_length(client: redis.Redis, app: Application, key: str) -> int:
    return client.llen(f"lock-queue:{app.name}:lock:{key}")


def blocked_in_blpop(client: redis.Redis, app: Application) -> int:
    """How many of ``app``'s Redis connections (``redis_app`` names them ``app.name``) are blocked in BLPOP now."""
    return sum(
        1
        for info in client.client_list()
        if info.get("name") == app.name and "b" in info["flags"] and info["cmd"] == "blpop"
    )


def test_a_release_wakes_a_blocked_waiter_at_once(redis_app: Application, redis_client: redis.Redis) -> None:
    locks = redis_app.lock_manager

    def wait_for_the_lock() -> tuple[Lock, float]:
        lock = locks.acquire("job", ttl=10, timeout=60)
        return lock, time.monotonic()

    # Given a holder with a 60 s ttl and a waiter queued and blocked in BLPOP on its grant list
    held = locks.acquire("job", ttl=60)
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(wait_for_the_lock)
        wait_until(
            lambda: queue_length(redis_client, redis_app, "job") == 1 and blocked_in_blpop(redis_client, redis_app),
            message="the waiter queued and blocked in BLPOP",
        )
        assert not waiting.done()
        # When the holder releases
        released_at = time.monotonic()
        held.release()
        lock, acquired_at = waiting.result(timeout=10)
    # Then the waiter got it after the release, at once: long before the holder's ttl, and before its BLPOP
    # (up to WAIT_CHUNK) would have ended by itself (the release pushed onto its grant list; no polling)
    assert released_at <= acquired_at < released_at + WAIT_CHUNK / 2
    assert lock.token == held.token + 1
    lock.release()


def test_waiters_get_the_lock_in_the_order_they_came(redis_app: Application, redis_client: redis.Redis) -> None:
    client = redis_client
    locks = redis_app.lock_manager
    order: list[tuple[str, int]] = []
    contested: list[str] = []

    def wait_then_release(name: str, behind: int) -> None:
        with locks.acquire("job", ttl=10, timeout=30) as lock:
            order.append((name, lock.token))
            # Release only with every later waiter blocked in BLPOP, free to take the lock if the order were not kept
            wait_until(lambda: blocked_in_blpop(client, redis_app) == behind, message=f"{behind} waiters blocked")
            contested.append(name)

    # Given a holder and three waiters that queued up one after the other
    held = locks.acquire("job", ttl=60)
    threads = [
        threading.Thread(target=wait_then_release, args=(name, 2 - i), name=f"waiter-{name}")
        for i, name in enumerate("abc")
    ]
    for number, thread in enumerate(threads, start=1):
        thread.start()
        wait_until(lambda number=number: queue_length(client, redis_app, "job") == number)
    # When the holder releases
    held.release()
    for thread in threads:
        thread.join(30)
    # Then each got the lock in turn, in the order they came, each with a higher token
    assert [name for name, _ in order] == ["a", "b", "c"]
    assert contested == ["a", "b", "c"]
    assert [token for _, token in order] == [held.token + 1, held.token + 2, held.token + 3]
    # And nothing is left behind: no lock, no queue, no waiter record, no hand-off list
    assert client.keys(f"*{redis_app.name}:lock:job*") == []


def test_a_waiter_that_times_out_leaves_the_queue(redis_app: Application, redis_client: redis.Redis) -> None:
    client = redis_client
    held = redis_app.lock_manager.acquire("job", ttl=60)
    # When a waiter, seen in the queue, gives up after 1 s
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(redis_app.lock_manager.acquire, "job", 60, 1.0)
        wait_until(lambda: queue_length(client, redis_app, "job") == 1, message="the waiter queued")
        with pytest.raises(LockAcquireError):
            waiting.result(timeout=10)
    # Then it is out of the queue, and the holder's release frees the lock instead of handing it to nobody
    assert queue_length(client, redis_app, "job") == 0
    held.release()
    assert redis_app.lock_manager.get_lock("job") is None
    assert client.keys(f"*{redis_app.name}:lock:job*") == []


def waiter_node(cluster_env: dict[str, str], key: str) -> NodeProcess:
    """A node process that waits for ``key`` (ttl 1 s) until the test kills it."""
    node = NodeProcess(SCENARIO, env=cluster_env, start=False).spawn().wait_ready()
    expr = f"app.lock_manager.acquire({key!r}, ttl=1.0, timeout=60).token"
    threading.Thread(target=request_until_killed, args=(node, expr), name="dead-waiter", daemon=True).start()
    return node


def request_until_killed(node: NodeProcess, expr: str) -> None:
    with contextlib.suppress(AssertionError):  # the node is killed before it replies
        node.request({"cmd": "eval", "expr": expr}, timeout=60)


def test_a_killed_waiter_delays_the_next_one_by_its_ttl_at_most(
    cluster_env: dict[str, str], redis_app: Application, redis_client: redis.Redis
) -> None:
    client = redis_client
    locks = redis_app.lock_manager
    # Given a holder, a waiter in a node process (ttl 1 s) and a waiter in this process behind it
    held = locks.acquire("job", ttl=60)
    node = waiter_node(cluster_env, "job")
    try:
        wait_until(lambda: queue_length(client, redis_app, "job") == 1)
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiting = pool.submit(locks.acquire, "job", 10, 30)
            wait_until(lambda: queue_length(client, redis_app, "job") == 2)
            # When the node process is killed while it waits, and the holder releases at once
            node.kill()
            held.release()
            released_at = time.monotonic()
            # Then the lock went to the dead waiter, first in line (its record has not expired yet) ...
            dead = locks.get_lock("job")
            assert dead.instance_id == node.instance_id
            # ... and the next waiter gets it once that ttl of 1 s has run out, long before the holder's 60 s
            lock = waiting.result(timeout=30)
        assert 0.9 <= time.monotonic() - released_at < 5
        assert lock.token == dead.token + 1
        lock.release()
    finally:
        node.stop()


def queue_up(scripts: LockScripts, name: str, sequence: str, owner: str, ttl: float) -> None:
    """One "wait" attempt of the acquire script for ``owner`` (``"{instance}:{nonce}"``, ``ttl`` seconds): the only
    waiter queued, its record living 4 s."""
    nonce = owner.rsplit(":", 1)[-1]
    assert scripts.acquire(name, sequence, owner, nonce, ttl, 4.0, "wait")[0] == 0
    assert scripts.client.lrange(f"lock-queue:{name}", 0, -1) == [nonce.encode()]


def acquisition(
    scripts: LockScripts, name: str, sequence: str, owner: str, ttl: float, signal_expire: float = 1.0
) -> Acquisition:
    """An acquisition of ``name`` by ``owner`` with an owner id the test chose (a backend picks a random nonce)."""
    return Acquisition(scripts, name, sequence, owner, ttl, chunk=WAIT_CHUNK, signal_expire=signal_expire)


def test_a_waiter_back_after_its_hand_off_list_expired_still_gets_the_lock(
    redis_client: redis.Redis, lock_scripts: LockScripts, lua_lock: tuple[str, str]
) -> None:
    # The Lua level: a release hands the lock to a queued waiter that is not blocked in BLPOP at that moment
    client, scripts, (name, sequence) = redis_client, lock_scripts, lua_lock
    holder = acquisition(scripts, name, sequence, "holder:1", 60, signal_expire=0.001)  # its hand-offs wait 1 ms
    assert holder.acquire(timeout=0)
    waiter = acquisition(scripts, name, sequence, "waiter:2", 5)
    # Given the waiter queued (one "wait" attempt), then gone for longer than its hand-off list lives
    queue_up(scripts, name, sequence, "waiter:2", 5.0)
    holder.release()
    assert client.get(name) == f"waiter:2:{holder.token + 1}".encode()
    wait_until(lambda: not client.exists(f"lock-grant:{name}:2"), message="the hand-off list to expire")
    # When it comes back, it finds the lock held under its own owner id: it holds it, with the next token
    assert waiter.acquire(timeout=0.5) and waiter.token == holder.token + 1
    assert client.get(name) == f"waiter:2:{waiter.token}".encode()
    waiter.release()


class Interrupted(Exception):
    """Raised by a signal handler in the middle of a wait."""


def test_a_waiter_interrupted_while_queued_leaves_the_queue(redis_app: Application, redis_client: redis.Redis) -> None:
    client = redis_client
    held = redis_app.lock_manager.acquire("job", ttl=60)

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    queued: list[int] = []

    def interrupt_once_blocked(main: int) -> None:
        wait_until(lambda: blocked_in_blpop(client, redis_app), message="the waiter blocked in BLPOP")
        queued.append(queue_length(client, redis_app, "job"))
        signal.pthread_kill(main, signal.SIGALRM)

    previous = signal.signal(signal.SIGALRM, interrupt)
    main = threading.get_ident()
    interrupter = threading.Thread(target=interrupt_once_blocked, args=(main,), name="interrupter")
    try:
        # When a waiter in this (main) thread is interrupted by a signal handler that raises, mid-BLPOP
        interrupter.start()
        with pytest.raises(Interrupted):
            redis_app.lock_manager.acquire("job", ttl=30, timeout=10)
    finally:
        interrupter.join(10)
        signal.signal(signal.SIGALRM, previous)
    assert queued == [1]
    # Then it left the queue: the holder's release frees the lock instead of handing it to a waiter that is gone
    assert queue_length(client, redis_app, "job") == 0
    held.release()
    assert redis_app.lock_manager.get_lock("job") is None


def test_a_stale_hand_off_is_not_taken_for_the_lock(
    redis_client: redis.Redis, lock_scripts: LockScripts, lua_lock: tuple[str, str]
) -> None:
    # The Lua level: a waiter handed the lock with a 50 ms ttl comes back after that ttl and another took it
    client, scripts, (name, sequence) = redis_client, lock_scripts, lua_lock
    holder = acquisition(scripts, name, sequence, "holder:1", 60)
    assert holder.acquire(timeout=0)
    queue_up(scripts, name, sequence, "waiter:2", 0.05)
    holder.release()  # hands it to the waiter for 50 ms; its token waits in its list for 1 s
    wait_until(lambda: not client.exists(name), message="the 50 ms hand-off to expire")
    assert client.exists(f"lock-grant:{name}:2")  # the stale hand-off is still there to be mistaken
    other = acquisition(scripts, name, sequence, "other:3", 60)
    assert other.acquire(timeout=0)
    # When the waiter comes back, the old hand-off in its list does not make it a second holder
    late = acquisition(scripts, name, sequence, "waiter:2", 5)
    assert late.acquire(timeout=0) is False
    assert client.get(name) == f"other:3:{other.token}".encode()
    other.release()


def test_a_socket_timeout_too_short_for_a_wait_is_refused(redis_url: str) -> None:
    with pytest.raises(ValueError, match=r"socket_timeout must be at least 0.5 s"):
        RedisLockBackend(url=redis_url, socket_timeout=0.2)


def test_a_wait_longer_than_the_socket_timeout_does_not_trip_it(redis_url: str, app_name: str) -> None:
    # Given a backend whose Redis calls time out after 0.5 s, and a lock held for 1.5 s
    backend = {**redis_locks(redis_url), "OPTIONS": {"url": redis_url, "socket_timeout": 0.5}}
    app = Application({"NAME": app_name, "LOCKS": backend})
    try:
        held = app.lock_manager.acquire("job", ttl=1.5)
        # When a waiter waits for it, then Redis's socket timeout does not break the wait (redis-py#2807)
        lock = app.lock_manager.acquire("job", ttl=5, timeout=30)
        assert lock.token > held.token
        lock.release()
        with pytest.raises(LockNotOwned):
            held.release()
    finally:
        app.lock_manager.close()
        delete_lock_keys(redis_url, app_name)


def test_an_unreachable_redis_raises_backend_unavailable_naming_the_key(app_name: str) -> None:
    app = Application({"NAME": app_name, "LOCKS": redis_locks("redis://127.0.0.1:9/0")})
    with pytest.raises(BackendUnavailable, match=rf"'{app_name}:lock:job'.*unavailable"):
        app.lock_manager.acquire("job", timeout=1)


def manage_locks(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "locks", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_the_locks_command_lists_shows_and_force_releases(redis_app: Application, redis_url: str) -> None:
    env = {
        **os.environ,
        "DJANGO_ENV": "test",
        "NOCLUSTER_TEST_RUN": RUN_ID,
        "NOCLUSTER_NAME": redis_app.name,
        "REDIS_URL": redis_url,
    }
    locks = redis_app.lock_manager
    held = locks.acquire("jobs:nightly", ttl=60)
    other = locks.acquire("reports", ttl=60)
    weekly = locks.acquire("jobs:weekly", ttl=60)
    pool = ThreadPoolExecutor(max_workers=1)
    waiter = pool.submit(locks.acquire, "jobs:weekly", 10, 60)
    try:
        wait_until(lambda: locks.get_lock("jobs:weekly").waiting == 1, message="a waiter for jobs:weekly")
        # list with a pattern, and show: holder instance, token, how many wait
        listed = manage_locks(env, "list", "jobs:*")
        assert listed.returncode == 0, listed.stderr
        assert "jobs:nightly" in listed.stdout and redis_app.instance_id in listed.stdout
        assert "reports" not in listed.stdout
        header, *rows = listed.stdout.splitlines()
        assert header.split()[:4] == ["KEY", "INSTANCE", "TOKEN", "WAITING"]
        assert {row.split()[0]: row.split()[3] for row in rows} == {"jobs:nightly": "0", "jobs:weekly": "1"}
        as_json = json.loads(manage_locks(env, "list", "--json", "jobs:weekly").stdout)
        assert [(entry["key"], entry["waiting"]) for entry in as_json] == [("jobs:weekly", 1)]
        shown = manage_locks(env, "show", "jobs:nightly")
        assert shown.returncode == 0 and f"token:         {held.token}" in shown.stdout, shown.stdout
        # release without --force is refused with a one-line error
        refused = manage_locks(env, "release", "jobs:nightly")
        assert refused.returncode != 0 and "without --force" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert redis_app.lock_manager.get_lock("jobs:nightly") is not None
        # release --force frees it; the old holder's release then raises
        released = manage_locks(env, "release", "jobs:nightly", "--force")
        assert released.returncode == 0, released.stderr
        assert redis_app.lock_manager.get_lock("jobs:nightly") is None
        missing = manage_locks(env, "show", "jobs:nightly")
        assert missing.returncode != 0 and "not held" in missing.stderr
        with pytest.raises(LockNotOwned):
            held.release()
    finally:
        other.release()
        weekly.release()
        waiter.result(30).release()
        pool.shutdown()


def test_a_waiter_in_a_killed_process_stops_counting_within_seconds(
    cluster_env: dict[str, str], redis_app: Application, redis_client: redis.Redis
) -> None:
    client = redis_client
    locks = redis_app.lock_manager
    # Given a holder, a waiter in a node process and a waiter in this process: both count, on any node
    held = locks.acquire("job", ttl=60)
    node = waiter_node(cluster_env, "job")
    try:
        wait_until(lambda: locks.get_lock("job").waiting == 1, message="the node's waiter counted")
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiting = pool.submit(locks.acquire, "job", 10, 60)
            wait_until(lambda: locks.get_lock("job").waiting == 2, message="both waiters counted")
            # When the node process is killed while it waits
            node.kill()
            # Then its waiter stops counting once its record expires (WAIT_CHUNK + grace), though its id is still
            # in the queue, which the live waiter keeps alive
            wait_until(lambda: locks.get_lock("job").waiting == 1, timeout=15, message="the dead waiter uncounted")
            assert queue_length(client, redis_app, "job") == 2
            assert [info.waiting for info in locks.list_locks("job")] == [1]
            # And the live waiter still gets the lock when the holder lets go (the release skips the dead one)
            held.release()
            lock = waiting.result(timeout=30)
        assert locks.get_lock("job").waiting == 0
        lock.release()
    finally:
        node.stop()
