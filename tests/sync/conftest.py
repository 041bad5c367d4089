"""Nodes for the sync tests on every pub/sub backend, and a real PostgreSQL database whose transactions commit.

The same tests run over the in-process bus and over kombu on Redis and on RabbitMQ: several Applications of this
process, one per "node", each with its own consumer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from django.db import connection

from nocluster import Application
from settings.test import TEST_DATABASE_URL
from tests.conftest import server_unavailable
from tests.pubsub.conftest import BACKENDS, pubsub_config


@pytest.fixture
def committing_postgres(transactional_db: None) -> None:
    """The test database, PostgreSQL, with real commits (``transaction.on_commit`` callbacks run)."""
    if connection.vendor != "postgresql":
        server_unavailable("PostgreSQL", TEST_DATABASE_URL)


@pytest.fixture(params=BACKENDS)
def make_node(request: pytest.FixtureRequest, app_name: str) -> Iterator[Callable[[], Application]]:
    """Build and start in-process nodes sharing one pub/sub namespace on each backend; stopped afterwards."""
    nodes: list[Application] = []

    def make() -> Application:
        node = Application(
            {"NAME": app_name, "PUBSUB": pubsub_config(request.param, app_name, request), "SYNC": {"DEBOUNCE": 0.2}}
        )
        node.pub_sub_manager.start()
        nodes.append(node)
        return node

    yield make
    # Stop the nodes together: each consumer takes a drain interval to notice.
    stoppers = [threading.Thread(target=node.pub_sub_manager.stop) for node in nodes]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join(30)
