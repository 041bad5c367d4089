"""Test settings: the real servers of the machine, from ``DATABASE_URL``, ``REDIS_URL`` and ``AMQP_URL``.

Each test run is isolated by ``NOCLUSTER_TEST_RUN`` (set once by ``tests/conftest.py`` and inherited by the
node processes it spawns): it names the test database, the Redis key prefix and, through
``NOCLUSTER["NAME"]``, every channel, queue and lock of the run.
"""

from __future__ import annotations

import os
import socket
import uuid
from urllib.parse import urlsplit

import dj_database_url

from settings.base import *  # noqa: F403
from settings.base import CACHES, NOCLUSTER, env, env_bool


def run_id() -> str:
    """This run's id, inherited by every process it spawns. Under pytest-xdist each worker is a run of its own
    (the controller's id with the worker's name added), so two workers never share a name, key or queue."""
    run = os.environ.get("NOCLUSTER_TEST_RUN") or uuid.uuid4().hex[:10]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker and not run.endswith(worker):
        run += worker
    os.environ["NOCLUSTER_TEST_RUN"] = run
    return run


RUN_ID = run_id()

# Not the development key: node processes of the tests run with DEBUG off, as in production, and runnode refuses it.
SECRET_KEY = env("DJANGO_SECRET_KEY", f"test-key-of-run-{RUN_ID}-shared-by-its-processes-never-for-production")

TEST_DATABASE_URL = env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
TEST_REDIS_URL = env("REDIS_URL", "redis://127.0.0.1:6379/0")
TEST_AMQP_URL = env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def reachable(url: str, default_port: int = 5432) -> bool:
    """True when a TCP connection to the server of ``url`` opens within a second."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1):
            return True
    except OSError:
        return False


# PostgreSQL when reachable (always under CI: an unreachable server fails the run); SQLite otherwise.
if env_bool("CI") or reachable(TEST_DATABASE_URL):
    DATABASES = {"default": dj_database_url.parse(TEST_DATABASE_URL, engine="nocluster.postgresql")}
    # A spawned node process is pointed at the test database itself (DATABASE_URL names it), so it must not
    # prefix it again.
    if not DATABASES["default"]["NAME"].startswith("test_nocluster_"):
        DATABASES["default"]["TEST"] = {"NAME": f"test_nocluster_{RUN_ID}"}
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}

NOCLUSTER = {**NOCLUSTER, "NAME": env("NOCLUSTER_NAME", f"t{RUN_ID}"), "SYNC": {"DEBOUNCE": 0.2}}
# Off unless a test turns it on for its node processes: in-process applications of the tests must not write
# heartbeats from a thread into a database pytest-django guards.
NOCLUSTER["NODES"] = {**NOCLUSTER["NODES"], "ENABLED": env_bool("NOCLUSTER_NODE_REGISTRY", False)}
CACHES = {**CACHES}
CACHES["redis"] = {
    "BACKEND": "django_redis.cache.RedisCache",
    "LOCATION": TEST_REDIS_URL,
    "KEY_PREFIX": f"t{RUN_ID}",
    "OPTIONS": {
        "CLIENT_CLASS": "django_redis.client.DefaultClient",
        "SERIALIZER": "django_redis.serializers.json.JSONSerializer",
    },
}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# A plugin that exists only in tests: it records each run of its install() (tests/plugins/test_lifecycle.py).
INSTALLED_APPS = [*INSTALLED_APPS, "tests.fixture_plugin"]  # noqa: F405
