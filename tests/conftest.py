"""Fixtures for real servers (Redis, RabbitMQ, PostgreSQL) and per-test isolation.

A server that cannot be reached skips its tests with a message saying how to start it; when ``CI`` is set the
test fails instead. Isolation: ``settings.test`` names the run (``NOCLUSTER_TEST_RUN``: test database, key
prefix, app name); :func:`app_name` gives every test its own ``app.name`` on top, so channels, queues, cache
keys and locks of two tests (or two runs, or a node started by hand) never meet.

Files: every temporary file of the run (node and worker logs, the queue's slot files, pytest's ``tmp_path``)
goes into one per-run folder, ``TMPDIR`` for this process and every process it spawns, removed at the end.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.db import DatabaseError, connection

from settings.test import RUN_ID, TEST_AMQP_URL, TEST_DATABASE_URL, TEST_REDIS_URL, reachable

HOW_TO_START = {
    "Redis": 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no',
    "RabbitMQ": "rabbitmq-server -detached",
    "PostgreSQL": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
}
_counter = itertools.count(1)
KOMBU_BINDING_DEADLINES = "_kombu.binding_deadlines"

# Set before anything asks for a temporary file: tempfile caches its folder, and spawned processes inherit TMPDIR.
# A pytest-xdist worker makes its folder beside the controller's, not inside it: Chromium's socket path inside
# would be too long (a Unix socket path has at most 107 bytes).
_SYSTEM_TMPDIR = os.environ.setdefault("NOCLUSTER_TEST_SYSTEM_TMPDIR", tempfile.gettempdir())
RUN_TMPDIR = tempfile.mkdtemp(prefix=f"nocluster-test-{RUN_ID}-", dir=_SYSTEM_TMPDIR)
os.environ["TMPDIR"] = tempfile.tempdir = RUN_TMPDIR


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in {"", "0", "false", "no"}


def server_unavailable(server: str, url: str) -> None:
    """Fail under CI, skip otherwise, saying how to start the server."""
    message = f"{server} is not reachable at {url}; start it with: {HOW_TO_START[server]}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def server_cannot_start(server: str, reason: str) -> None:
    """A private server this test starts itself (a binary, not a URL) cannot run here: fail under CI, else skip."""
    message = f"cannot run a private {server} for this test: {reason}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """pytest-django's test database, dropped at the end only once no other session holds it (PostgreSQL refuses
    to drop a database in use, and the database would be left behind): a process or thread of the run still
    connected after 10 s is named in a warning and its session ended."""
    yield
    with django_db_blocker.unblock():
        if connection.vendor == "postgresql":
            end_other_sessions()
        connection.close()


def end_other_sessions(patience: float = 10.0) -> None:
    others_only = "datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    sessions = (
        f"SELECT pid, client_port, application_name, state, left(query, 60) FROM pg_stat_activity WHERE {others_only}"
    )
    deadline = time.monotonic() + patience
    with connection.cursor() as cursor:
        while True:
            cursor.execute(sessions)
            others = cursor.fetchall()
            if not others or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if others:
            warnings.warn(f"sessions still on the test database after the run, ended: {others}", stacklevel=1)
            try:  # a role that may not end them leaves the drop to fail as it would have
                cursor.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {others_only}")
            except DatabaseError as exc:
                warnings.warn(f"could not end them: {exc}", stacklevel=1)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the real Redis server (``REDIS_URL``, default ``redis://127.0.0.1:6379/0``)."""
    if not reachable(TEST_REDIS_URL, 6379):
        server_unavailable("Redis", TEST_REDIS_URL)
    return TEST_REDIS_URL


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """URL of the real RabbitMQ server (``AMQP_URL``, default ``amqp://guest:guest@127.0.0.1:5672//``)."""
    if not reachable(TEST_AMQP_URL, 5672):
        server_unavailable("RabbitMQ", TEST_AMQP_URL)
    return TEST_AMQP_URL


@pytest.fixture(params=["redis", "amqp"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each real broker in turn: Redis, then RabbitMQ."""
    return request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url")


@pytest.fixture
def postgres(db: None) -> None:
    """The Django test database, which must be PostgreSQL for this test."""
    if connection.vendor != "postgresql":
        server_unavailable("PostgreSQL", TEST_DATABASE_URL)


# Every app name the run gave out, so its broker queues can be deleted at the end (RabbitMQ keeps durable ones).
USED_NAMES: set[str] = set()


def unique_name(kind: str = "") -> str:
    """A name no other test, run or hand-started node uses (remembered for the clean-up of queues)."""
    name = f"t{RUN_ID}-{kind}{next(_counter)}"
    USED_NAMES.add(name)
    return name


@pytest.fixture
def app_name() -> str:
    """A name no other test, run or hand-started node uses: prefix for channels, queues, keys and locks."""
    return unique_name()


@pytest.fixture
def test_database_url(transactional_db: None) -> str:
    """A URL of this run's test database, for node processes (tests using it see committed data only)."""
    params = connection.settings_dict
    if connection.vendor != "postgresql":
        server_unavailable("PostgreSQL", TEST_DATABASE_URL)
    user = params.get("USER") or "postgres"
    password = f":{params['PASSWORD']}" if params.get("PASSWORD") else ""
    return (
        f"postgres://{user}{password}@{params.get('HOST') or '127.0.0.1'}:{params.get('PORT') or 5432}/{params['NAME']}"
    )


@pytest.fixture
def node_env(test_database_url: str, redis_url: str, app_name: str) -> Iterator[dict[str, str]]:
    """Environment for node processes of this test: test settings, this run's database, Redis and app name.

    Add ``BROKER_URL`` / ``PUBSUB_URL`` to make the nodes use a real broker.
    """
    env = {
        "DJANGO_ENV": "test",
        "DJANGO_SETTINGS_MODULE": "settings",
        "NOCLUSTER_TEST_RUN": RUN_ID,
        "NOCLUSTER_NAME": app_name,
        "DATABASE_URL": test_database_url,
        "REDIS_URL": redis_url,
    }
    yield env


@pytest.fixture(scope="session", autouse=True)
def delete_run_keys() -> Iterator[None]:
    """After the run, delete the Redis keys it left (lock token counters, caches, kombu bindings): all carry the
    run id."""
    yield
    if not reachable(TEST_REDIS_URL, 6379):
        return
    import redis

    client = redis.Redis.from_url(TEST_REDIS_URL)
    names = list(client.scan_iter(match=f"*t{RUN_ID}*", count=1000))
    for start in range(0, len(names), 500):
        client.delete(*names[start : start + 500])
    # kombu's Redis transport lists every expiring binding table in one shared sorted set, swept only by a later
    # consumer: drop this run's members from it too.
    members = [member for member, _ in client.zscan_iter(KOMBU_BINDING_DEADLINES, match=f"t{RUN_ID}*", count=1000)]
    for start in range(0, len(members), 500):
        client.zrem(KOMBU_BINDING_DEADLINES, *members[start : start + 500])
    client.close()


@pytest.fixture(scope="session", autouse=True)
def delete_run_queues() -> Iterator[None]:
    """After the run, delete the RabbitMQ queues its projects declared: every channel any of them subscribes
    (the plugins' and the test scenarios'), Celery's default queue, and every other queue and exchange named after
    one of its projects (pub/sub queues would expire by themselves, but a minute later)."""
    yield
    if not reachable(TEST_AMQP_URL, 5672) or not USED_NAMES:
        return
    from kombu import Connection

    from nocluster import Application, app
    from tests.queue import scenarios

    probe = Application(
        {"NAME": "probe", "EVENT_QUEUE": {"BACKEND": "nocluster.queue.backends.memory.MemoryQueueBackend"}}
    )
    scenarios.register(probe)
    channels = {"celery", "raw", *app.event_queue.channels(), *probe.event_queue.channels()}
    with Connection(TEST_AMQP_URL) as connection:
        channel = connection.default_channel
        for name in sorted(USED_NAMES):
            for queue in channels:
                channel.queue_delete(f"{name}.{queue}")
        # Queues named after a process (the pub/sub queue of a killed node's or pool process's instance id, which
        # would expire only a minute later) and the exchanges (Celery's and pub/sub's are durable): AMQP cannot
        # list them, rabbitmqctl can.
        for queue in rabbitmq_names("queues"):
            if named_after_a_project(queue):
                channel.queue_delete(queue)
        for exchange in rabbitmq_names("exchanges"):
            if named_after_a_project(exchange):
                channel.exchange_delete(exchange)


def named_after_a_project(name: str) -> bool:
    """Whether a RabbitMQ name has one of this run's project names as a part between dots or colons:
    ``<project>.celery``, ``<project>.<instance id>``, Celery's ``<project>:control.pidbox``,
    ``reply.<project>:control.pidbox``, a worker's ``<worker>@<host>.<project>:control.pidbox``."""
    return not USED_NAMES.isdisjoint(re.split(r"[.:]", name))


def rabbitmq_names(kind: str) -> list[str]:
    """The names of the local RabbitMQ's ``kind`` (``queues`` or ``exchanges``) in its default vhost (empty, with
    a note, if rabbitmqctl cannot tell)."""
    try:
        listed = subprocess.run(
            ["rabbitmqctl", f"list_{kind}", "-q", "--no-table-headers", "name"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"{kind} of this run not deleted: rabbitmqctl: {exc}")
        return []
    return listed.stdout.split()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the run's temporary folder (logs, slot files, tmp_path) once everything has stopped."""
    shutil.rmtree(RUN_TMPDIR, ignore_errors=True)


def pytest_report_header(config: pytest.Config) -> list[str]:
    db = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    return [f"nocluster test run {RUN_ID}: database {db}, CI={'yes' if in_ci() else 'no'}, files in {RUN_TMPDIR}"]
