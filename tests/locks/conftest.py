"""Lock fixtures: a LockManager on each backend, with this test's own ``app.name`` and no keys left behind."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from nocluster import Application
from nocluster.locks import LockManager

if TYPE_CHECKING:
    from nocluster.locks.backends.redis_scripts import LockScripts

LOCAL = {"BACKEND": "nocluster.locks.backends.local.LocalLockBackend", "OPTIONS": {}}


def redis_locks(url: str) -> dict[str, Any]:
    return {"BACKEND": "nocluster.locks.backends.redis.RedisLockBackend", "OPTIONS": {"url": url}}


def named_client(url: str, client_name: str) -> str:
    """``url`` with ``client_name`` set, so CLIENT LIST shows which connections are this test's (and blocked)."""
    parts = urlsplit(url)
    query = urlencode([*parse_qsl(parts.query), ("client_name", client_name)])
    return urlunsplit(parts._replace(query=query))


def delete_lock_keys(url: str, app_name: str) -> None:
    """Delete this app's lock keys: the locks, their waiter queues, records and hand-off lists, the token sequence."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        names = [*client.scan_iter(match=f"*{app_name}:lock:*", count=1000), f"{app_name}:lock-tokens"]
        client.delete(*names)
    finally:
        client.close()


@pytest.fixture
def redis_app(redis_url: str, app_name: str) -> Iterator[Application]:
    """An Application named ``app_name`` whose locks are on the real Redis, its connections named ``app_name``."""
    app = Application({"NAME": app_name, "LOCKS": redis_locks(named_client(redis_url, app_name))})
    yield app
    app.lock_manager.close()
    delete_lock_keys(redis_url, app_name)


@pytest.fixture(params=["local", "redis"])
def lock_app(request: pytest.FixtureRequest, app_name: str) -> Application:
    """An Application named ``app_name`` on each lock backend in turn: local, then Redis."""
    if request.param == "redis":
        return request.getfixturevalue("redis_app")
    return Application({"NAME": app_name, "LOCKS": LOCAL})


@pytest.fixture
def locks(lock_app: Application) -> LockManager:
    """``lock_app.lock_manager`` (the contract suite runs on every backend through it)."""
    return lock_app.lock_manager


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    """A plain redis-py client on the test Redis, to look at the keys a lock leaves."""
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def lock_scripts(redis_client: Any) -> LockScripts:
    """The Redis lock scripts, registered on ``redis_client`` (for tests at the Lua level)."""
    from nocluster.locks.backends.redis_scripts import LockScripts

    return LockScripts(redis_client)


@pytest.fixture
def lua_lock(redis_client: Any, app_name: str) -> Iterator[tuple[str, str]]:
    """``(lock name, token sequence)`` of this test; its keys are deleted after."""
    name, sequence = f"{app_name}:lock:job", f"{app_name}:lock-tokens"
    yield name, sequence
    redis_client.delete(name, sequence, *redis_client.keys(f"*{name}*"))
