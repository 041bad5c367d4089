"""In-process nodes on the local pub/sub bus, and a real PostgreSQL database whose transactions commit."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from django.db import connection

from nocluster import Application
from settings.test import TEST_DATABASE_URL
from tests.conftest import server_unavailable

LOCAL_BACKEND = "nocluster.pubsub.backends.local.LocalPubSubBackend"


@pytest.fixture
def committing_postgres(transactional_db: None) -> None:
    """The test database, PostgreSQL, with real commits (``transaction.on_commit`` callbacks run)."""
    if connection.vendor != "postgresql":
        server_unavailable("PostgreSQL", TEST_DATABASE_URL)


@pytest.fixture
def make_node(app_name: str) -> Iterator[Callable[[], Application]]:
    """Build and start in-process nodes sharing one local bus; stopped afterwards."""
    nodes: list[Application] = []

    def make() -> Application:
        node = Application(
            {
                "NAME": app_name,
                "PUBSUB": {"BACKEND": LOCAL_BACKEND, "OPTIONS": {"bus": app_name}},
                "SYNC": {"DEBOUNCE": 0.2},
            }
        )
        node.pub_sub_manager.start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.pub_sub_manager.stop()
