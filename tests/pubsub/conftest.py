"""In-process clusters for the pub/sub contract: several Applications of this process, one per "node"."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nocluster import Application

BACKENDS = ["local", "redis", "amqp"]


def pubsub_config(kind: str, app_name: str, request: pytest.FixtureRequest, **options: Any) -> dict[str, Any]:
    if kind == "local":
        return {"BACKEND": "nocluster.pubsub.backends.local.LocalPubSubBackend", "OPTIONS": {"bus": app_name}}
    url = request.getfixturevalue("redis_url" if kind == "redis" else "amqp_url")
    return {
        "BACKEND": "nocluster.pubsub.backends.kombu.KombuPubSubBackend",
        "OPTIONS": {"url": url, **options},
    }


@pytest.fixture(params=BACKENDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_app(backend_kind: str, app_name: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., Application]]:
    """Build (not start) Applications sharing one pub/sub namespace on ``backend_kind``; all stopped afterwards."""
    built: list[Application] = []

    def make(**options: Any) -> Application:
        config = {"NAME": app_name, "PUBSUB": pubsub_config(backend_kind, app_name, request, **options)}
        application = Application(config)
        built.append(application)
        return application

    yield make
    # Stop the nodes together: each consumer takes a drain interval to notice.
    stoppers = [threading.Thread(target=application.pub_sub_manager.stop) for application in built]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join(30)


@pytest.fixture
def cluster(make_app: Callable[..., Application]) -> list[Application]:
    """Three started in-process nodes."""
    nodes = [make_app() for _ in range(3)]
    for node in nodes:
        node.pub_sub_manager.start()
    return nodes
