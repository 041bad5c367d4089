"""What only the in-process backends (memory and database) show: cancel in this process, and subscribing again
with a lower concurrency. What every backend does is in test_contract.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from nocluster import Application
from nocluster.models import FailedMessage
from tests.helpers import wait_until
from tests.queue.conftest import IN_PROCESS, Cluster, _in_process
from tests.queue.scenarios import of


@pytest.fixture(params=sorted(IN_PROCESS))
def local_queue(request: pytest.FixtureRequest, transactional_db: None) -> Iterator[Cluster]:
    yield _in_process(request)


def test_cancel_fires_the_signal_and_spends_no_retry(local_queue: Cluster) -> None:
    queue = local_queue.app.event_queue
    message_id = queue.publish("long", {"sleep": 10}, max_retries=3)
    wait_until(lambda: message_id in queue.running(), timeout=5)

    assert queue.cancel(message_id)

    local_queue.drain(10)
    assert [event["reason"] for event in of(local_queue.events("long-aborted"), message_id)] == ["cancelled"]
    assert len(of(local_queue.events("long-start"), message_id)) == 1
    assert not FailedMessage.objects.filter(message_id=message_id).exists()
    assert not queue.cancel(message_id)


def test_subscribing_again_with_a_lower_concurrency_is_obeyed(local_queue: Cluster) -> None:
    app: Application = local_queue.app
    # Given a channel subscribed with concurrency 3 and started, then subscribed again with concurrency 1
    running, peak = 0, 0
    guard = threading.Lock()

    def work(payload: object, context: object) -> None:
        nonlocal running, peak
        with guard:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)  # the work itself
        with guard:
            running -= 1

    app.event_queue.subscribe("resub", work, concurrency=3)
    app.event_queue.start()
    app.event_queue.subscribe("resub", work, concurrency=1)
    for n in range(12):
        app.event_queue.publish("resub", n)
    local_queue.drain(20)
    # Then never more than one ran at once
    assert peak == 1
