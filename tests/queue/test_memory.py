"""The event queue on the memory backend (threads in this process), the embedded default."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import transaction

from nocluster import Application, UnknownChannel
from nocluster.models import FailedMessage
from settings.test import RUN_ID
from tests.helpers import wait_until
from tests.queue import scenarios
from tests.queue.scenarios import max_overlap, of

MEMORY = "nocluster.queue.backends.memory.MemoryQueueBackend"
_names = itertools.count(1)


@pytest.fixture
def memory_app(redis_url: str) -> Iterator[Application]:
    """A project on the memory backend with the test channels, its workers started (events go to Redis)."""
    name = f"t{RUN_ID}-m{next(_names)}"
    options = {"retry_backoff": 0.05, "retry_backoff_max": 0.2, "grace": 0.5, "poll_interval": 0.05}
    app = Application({"NAME": name, "EVENT_QUEUE": {"BACKEND": MEMORY, "OPTIONS": options}})
    scenarios.register(app)
    app.event_queue.start()
    yield app
    app.event_queue.stop()
    scenarios.client().delete(scenarios.events_key(name))


def events(app: Application, kind: str) -> list[dict[str, Any]]:
    return scenarios.events(app.name, kind)


def test_each_message_runs_once(memory_app: Application) -> None:
    ids = [memory_app.event_queue.publish("echo", {"n": n}) for n in range(5)]

    assert memory_app.event_queue.backend.drain(10)
    assert sorted(event["id"] for event in events(memory_app, "echo")) == sorted(ids)
    assert {event["retried"] for event in events(memory_app, "echo")} == {0}


def test_retried_counts_up_to_max_retries_then_the_message_is_recorded_failed(
    memory_app: Application, transactional_db: None
) -> None:
    message_id = memory_app.event_queue.publish("flaky", {"succeed_at": None}, max_retries=2)

    assert memory_app.event_queue.backend.drain(10)
    assert [event["retried"] for event in of(events(memory_app, "flaky"), message_id)] == [0, 1, 2]
    record = FailedMessage.objects.get(message_id=message_id)
    assert (record.channel, record.tries, record.app_name) == ("flaky", 3, memory_app.name)
    assert "flaky failure on try 2" in record.error


def test_work_overrunning_its_timeout_sees_the_signal_and_is_retried(
    memory_app: Application, transactional_db: None
) -> None:
    message_id = memory_app.event_queue.publish("overrun", {"sleep": 5}, timeout=0.2, max_retries=1)

    assert memory_app.event_queue.backend.drain(10)
    tries = of(events(memory_app, "overrun"), message_id)
    assert [(event["retried"], event["aborted"], event["reason"]) for event in tries] == [
        (0, True, "timeout"),
        (1, True, "timeout"),
    ]
    assert FailedMessage.objects.get(message_id=message_id).tries == 2


def test_work_ignoring_its_signal_is_stopped_in_its_thread_after_the_grace(
    memory_app: Application, transactional_db: None
) -> None:
    # Given work that ignores its signal for 20 s, with timeout 0.2 s and grace 0.5 s
    started = time.monotonic()
    message_id = memory_app.event_queue.publish("stubborn", {"sleep": 20}, timeout=0.2)

    # Then it is stopped and recorded failed long before its 20 s
    assert memory_app.event_queue.backend.drain(10)
    assert time.monotonic() - started < 10
    assert "StoppedAfterGrace" in FailedMessage.objects.get(message_id=message_id).error
    assert not events(memory_app, "stubborn-end")


def test_concurrency_two_never_runs_three_at_once(memory_app: Application) -> None:
    for _ in range(6):
        memory_app.event_queue.publish("slow", {"sleep": 0.2})

    assert memory_app.event_queue.backend.drain(10)
    intervals = [(event["start"], event["end"]) for event in events(memory_app, "slow")]
    assert len(intervals) == 6
    assert max_overlap(intervals) == 2


def test_a_node_that_is_not_idle_leaves_messages_queued_without_spending_a_retry(memory_app: Application) -> None:
    scenarios.set_idle(memory_app.name, False)
    ids = {memory_app.event_queue.publish("gated", n) for n in range(3)}

    time.sleep(0.5)
    assert not events(memory_app, "gated")
    assert memory_app.event_queue.backend.depth(memory_app.event_queue.full_channel("gated")) == 3

    scenarios.set_idle(memory_app.name, True)
    assert memory_app.event_queue.backend.drain(10)
    assert {event["id"] for event in events(memory_app, "gated")} == ids
    assert {event["retried"] for event in events(memory_app, "gated")} == {0}


def test_cancel_fires_the_signal_and_spends_no_retry(memory_app: Application, transactional_db: None) -> None:
    message_id = memory_app.event_queue.publish("long", {"sleep": 10}, max_retries=3)
    wait_until(lambda: message_id in memory_app.event_queue.running(), timeout=5)

    assert memory_app.event_queue.cancel(message_id)

    assert memory_app.event_queue.backend.drain(5)
    assert [event["reason"] for event in of(events(memory_app, "long-aborted"), message_id)] == ["cancelled"]
    assert len(of(events(memory_app, "long-start"), message_id)) == 1
    assert not FailedMessage.objects.filter(message_id=message_id).exists()
    assert not memory_app.event_queue.cancel(message_id)


def test_a_rolled_back_transaction_publishes_nothing(memory_app: Application, transactional_db: None) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        memory_app.event_queue.publish("echo", "rolled back")
        raise RuntimeError("roll back")
    with transaction.atomic():
        memory_app.event_queue.publish("echo", "committed")
        assert memory_app.event_queue.backend.depth(memory_app.event_queue.full_channel("echo")) == 0

    assert memory_app.event_queue.backend.drain(10)
    assert [event["payload"] for event in events(memory_app, "echo")] == ["committed"]


def test_a_failed_message_can_be_requeued(memory_app: Application, transactional_db: None) -> None:
    message_id = memory_app.event_queue.publish("flaky", {"succeed_at": None})
    assert memory_app.event_queue.backend.drain(10)
    record = FailedMessage.objects.get(message_id=message_id)

    new_id = memory_app.event_queue.requeue(record)

    assert memory_app.event_queue.backend.drain(10)
    assert of(events(memory_app, "flaky"), new_id)
    assert not FailedMessage.objects.filter(pk=record.pk).exists()
    assert FailedMessage.objects.filter(message_id=new_id).exists()


def test_bad_publishes_get_errors_naming_the_channel(memory_app: Application) -> None:
    with pytest.raises(UnknownChannel, match="'nobody'"):
        memory_app.event_queue.publish("nobody", {})
    with pytest.raises(TypeError, match="'echo'"):
        memory_app.event_queue.publish("echo", {"when": object()})
    with pytest.raises(ValueError, match=r"'echo'.*timeout"):
        memory_app.event_queue.publish("echo", {}, timeout=0)
    with pytest.raises(ValueError, match=r"'echo'.*max_retries"):
        memory_app.event_queue.publish("echo", {}, max_retries=-1)
    assert memory_app.event_queue.backend.drain(5)
    assert not events(memory_app, "echo")


def test_subscribing_again_with_a_lower_concurrency_is_obeyed(memory_app: Application) -> None:
    import threading
    import time

    # Given a channel subscribed with concurrency 3 and started, then subscribed again with concurrency 1
    running, peak = 0, 0
    guard = threading.Lock()

    def work(payload: object, context: object) -> None:
        nonlocal running, peak
        with guard:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with guard:
            running -= 1

    memory_app.event_queue.subscribe("resub", work, concurrency=3)
    memory_app.event_queue.start()
    memory_app.event_queue.subscribe("resub", work, concurrency=1)
    for n in range(12):
        memory_app.event_queue.publish("resub", n)
    assert memory_app.event_queue.backend.drain(20)
    # Then never more than one ran at once
    assert peak == 1
