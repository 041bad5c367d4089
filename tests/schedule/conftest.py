"""Fixtures of the scheduler tests: nodes of one project as in-process Applications on the test database.

Each :class:`Node` is an Application with the embedded event queue (the database backend) and a 1-second job on
channel ``tick``, whose handler records what it ran. Its scheduler does not run its own thread (``ENABLED``
False): a test calls ``tick(now)`` with the times it chooses, so clocks, pauses and downtimes are exact.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nocluster import Application
from nocluster.models import ScheduleRun
from nocluster.schedule import PeriodicJob, run_info
from tests.conftest import unique_name

DATABASE_QUEUE = "nocluster.queue.backends.database.DatabaseQueueBackend"
QUEUE_OPTIONS = {"retry_backoff": 0.05, "retry_backoff_max": 0.2, "grace": 0.5, "poll_interval": 0.05}
# A fixed start for the tests' clocks, on a whole second.
T0 = datetime(2031, 3, 4, 5, 6, 7, tzinfo=UTC)


def at(offset: float) -> datetime:
    """``T0`` + ``offset`` seconds."""
    return T0 + timedelta(seconds=offset)


class Clock:
    """A clock a test sets (``now``); the scheduler reads it as ``clock()``."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Ran:
    """What the ``tick`` handlers of one project ran: the run descriptions carried by the payloads."""

    items: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    fail_with: str = ""

    def handler(self, payload: Any, context: Any) -> None:
        info = run_info(payload)
        with self.lock:
            self.items.append({**(info or {}), "message_id": context.id, "payload": payload})
        if self.fail_with:
            raise RuntimeError(self.fail_with)


@dataclass
class Project:
    """One project name, the nodes made for it, and what its handlers ran."""

    name: str
    ran: Ran
    nodes: list[Application] = field(default_factory=list)

    def runs(self, **filters: Any) -> list[ScheduleRun]:
        return list(ScheduleRun.objects.filter(app_name=self.name, **filters).order_by("slot", "claimed_at"))


NodeFactory = Callable[..., Application]


def job(name: str = "tick", **options: Any) -> PeriodicJob:
    return PeriodicJob(name, channel="tick", **{"every": 1.0, **options})


@pytest.fixture
def project(transactional_db: None) -> Iterator[Project]:
    result = Project(unique_name("s"), Ran())
    yield result
    for node in result.nodes:
        node.scheduler.stop()
        node.event_queue.stop()


@pytest.fixture
def make_node(project: Project) -> NodeFactory:
    """``make_node(*jobs, clock=None, grace=5.0, **schedule)``: a new node of the project (default job: ``tick``)."""

    def make(*jobs: PeriodicJob, clock: Clock | None = None, grace: float = 5.0, **schedule: Any) -> Application:
        config = {
            "NAME": project.name,
            "EVENT_QUEUE": {"BACKEND": DATABASE_QUEUE, "OPTIONS": QUEUE_OPTIONS},
            "SCHEDULE": {"ENABLED": False, "GRACE": grace, **schedule},
        }
        node = Application(config)
        node.event_queue.subscribe("tick", project.ran.handler)
        for declared in jobs or (job(),):
            node.scheduler.add(declared)
        if clock is not None:
            node.scheduler.clock = clock
        project.nodes.append(node)
        return node

    return make


def run_all(node: Application) -> None:
    """Start ``node``'s queue workers and scheduler (outcomes tracked) and wait until the queue is empty."""
    node.scheduler.start()
    node.event_queue.start()
    assert node.event_queue.drain(20), "the queue did not drain"
