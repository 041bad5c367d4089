"""Delayed, unique, cancelled and paused messages: the same tests on every backend (the ``queue`` fixture: memory,
database, and Celery with real worker processes on Redis and on RabbitMQ).

"Nothing ran" is proven by a drained queue, or, for a paused channel whose messages stay queued, by the depth of
its queue holding every message while nothing else of it is held or running; never by a fixed sleep.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from nocluster.db import close_this_thread_connections
from nocluster.models import CancelledMessage, ChannelState, UniqueMessage
from tests.helpers import wait_until
from tests.queue import scenarios
from tests.queue.conftest import Cluster
from tests.queue.scenarios import of

pytestmark = pytest.mark.cluster


def run_times(queue: Cluster, kind: str, message_id: str) -> list[float]:
    return [event["t"] for event in of(queue.events(kind), message_id)]


def wait_ran(queue: Cluster, kind: str, *ids: str) -> None:
    wanted = set(ids)
    wait_until(lambda: wanted <= {e["id"] for e in queue.events(kind)}, timeout=30, message=f"{kind} {wanted}")


class Since:
    """The events recorded after this point (a Celery cluster is shared by the tests of a run)."""

    def __init__(self, queue: Cluster) -> None:
        self.queue = queue
        self.start = {kind: len(queue.events(kind)) for kind in ("echo", "held", "pausable", "flaky")}

    def ids(self, kind: str) -> list[str]:
        return [event["id"] for event in self.queue.events(kind)[self.start[kind] :]]


# --- delayed messages ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("delay", [1.0, 3.5])  # 3.5 s is longer than a Celery test worker holds one (2 s): hops
def test_a_delayed_message_runs_no_earlier_than_its_delay_and_less_than_a_second_after(
    queue: Cluster, delay: float
) -> None:
    if delay > 1 and not queue.celery:
        queue.app.event_queue.backend.longest_delay = 1.5  # make the in-process backends hop too
    # When a message is published with a delay
    published = time.time()
    message_id = queue.app.event_queue.publish("echo", {"n": 1}, timeout=5, delay=delay)

    # Then it runs once, not before the delay, and less than a second after it
    wait_ran(queue, "echo", message_id)
    queue.drain()
    [ran] = run_times(queue, "echo", message_id)
    print(f"{queue.broker}: delay {delay} s, ran {ran - published - delay:.3f} s after it")
    assert published + delay <= ran < published + delay + 1.0, ran - published


def test_an_eta_in_the_past_runs_at_once_and_a_future_one_no_earlier(queue: Cluster) -> None:
    now = timezone.now()
    late = queue.app.event_queue.publish("echo", {"n": "past"}, timeout=5, eta=now - timedelta(hours=1))
    future = queue.app.event_queue.publish("echo", {"n": "future"}, timeout=5, eta=now + timedelta(seconds=1))
    wait_ran(queue, "echo", late, future)
    queue.drain()
    assert run_times(queue, "echo", future)[0] >= (now + timedelta(seconds=1)).timestamp()
    assert len(run_times(queue, "echo", late)) == 1


def test_a_delayed_message_in_a_transaction_counts_its_delay_from_the_publish(queue: Cluster) -> None:
    with transaction.atomic():
        published = time.time()
        message_id = queue.app.event_queue.publish("echo", {"n": 1}, timeout=5, delay=1.0)
    wait_ran(queue, "echo", message_id)
    assert run_times(queue, "echo", message_id)[0] >= published + 1.0


def test_bad_delays_are_refused_naming_the_channel(queue: Cluster) -> None:
    publish = queue.app.event_queue.publish
    with pytest.raises(ValueError, match="channel 'echo': delay"):
        publish("echo", {}, timeout=5, delay=-1)
    with pytest.raises(TypeError, match="channel 'echo': delay"):
        publish("echo", {}, timeout=5, delay="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not both"):
        publish("echo", {}, timeout=5, delay=1, eta=timezone.now())
    with pytest.raises(ValueError, match="aware"):
        publish("echo", {}, timeout=5, eta=timezone.now().replace(tzinfo=None))
    with pytest.raises(TypeError, match="unique_key"):
        publish("echo", {}, timeout=5, unique_key="")
    with pytest.raises(TypeError, match="unique_key"):
        publish("echo", {}, timeout=5, unique_key="k" * 201)


# --- unique messages ------------------------------------------------------------------------------------------
def test_a_unique_key_queues_one_message_until_it_ends_then_frees(queue: Cluster) -> None:
    publish = queue.app.event_queue.publish
    since = Since(queue)
    # Given a message holding key "k" that runs until the test releases it
    first = publish("held", {}, timeout=5, unique_key="k")
    wait_ran(queue, "held", first)

    # When the key is published again while it runs, and while it is still queued
    assert publish("held", {}, timeout=5, unique_key="k") == first
    assert publish("echo", {}, timeout=5, unique_key="k") == first  # one key space per app, whatever the channel

    # Then, once it ended, nothing else ran and the key is free: the next publish queues a new message
    scenarios.client().set(f"{queue.name}:release:{first}", 1, ex=60)
    queue.drain()
    assert since.ids("held") == [first] and not since.ids("echo")
    assert not UniqueMessage.objects.filter(key="k").exists()
    second = publish("echo", {}, timeout=5, unique_key="k")
    assert second != first
    queue.drain()
    assert len(of(queue.events("echo"), second)) == 1


def test_a_unique_key_frees_when_its_message_fails_for_good_or_is_cancelled(queue: Cluster) -> None:
    publish = queue.app.event_queue.publish
    since = Since(queue)
    failing = publish("flaky", {"succeed_at": None}, timeout=5, unique_key="f")
    queue.drain()
    assert not UniqueMessage.objects.filter(key="f").exists()
    delayed = publish("echo", {}, timeout=5, delay=3, unique_key="c")
    queue.app.event_queue.cancel(delayed)
    again = publish("echo", {}, timeout=5, unique_key="c")
    assert again not in (delayed, failing)
    queue.drain()
    assert since.ids("echo") == [again]


def test_an_expired_unique_key_is_taken_over(queue: Cluster) -> None:
    publish = queue.app.event_queue.publish
    since = Since(queue)
    lost = publish("echo", {}, timeout=5, delay=3, unique_key="t", unique_ttl=0.2)
    wait_until(lambda: UniqueMessage.objects.filter(key="t", expires__lt=timezone.now()).exists(), timeout=5)
    taken = publish("echo", {}, timeout=5, unique_key="t")
    assert taken != lost
    queue.app.event_queue.cancel(lost)
    queue.drain()
    assert since.ids("echo") == [taken]


def test_a_unique_key_claimed_in_a_rolled_back_transaction_stays_free(queue: Cluster) -> None:
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        queue.app.event_queue.publish("echo", {}, timeout=5, unique_key="r")
        1 / 0  # noqa: B018
    assert not UniqueMessage.objects.filter(key="r").exists()
    message_id = queue.app.event_queue.publish("echo", {}, timeout=5, unique_key="r")
    queue.drain()
    assert len(of(queue.events("echo"), message_id)) == 1


def test_concurrent_publishes_with_one_key_queue_one_message(queue: Cluster) -> None:
    # 20 threads of this process at once (the 4-process test is in test_control_cluster.py)
    since = Since(queue)
    barrier = threading.Barrier(20)
    ids: list[str] = []

    def publish() -> None:
        barrier.wait()
        try:
            ids.append(queue.app.event_queue.publish("held", {}, timeout=5, unique_key="race"))
        finally:
            # Each thread opened a database connection of its own: closed, not left until the garbage collector
            # (20 per backend were still open at the end of a run, near PostgreSQL's max_connections).
            close_this_thread_connections()

    threads = [threading.Thread(target=publish) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1
    scenarios.client().set(f"{queue.name}:release:{ids[0]}", 1, ex=60)
    queue.drain()
    assert since.ids("held") == ids[:1]


# --- cancel ---------------------------------------------------------------------------------------------------------
def test_a_cancelled_delayed_message_never_runs(queue: Cluster) -> None:
    cancelled = queue.app.event_queue.publish("echo", {"n": "cancelled"}, timeout=5, delay=1)
    kept = queue.app.event_queue.publish("echo", {"n": "kept"}, timeout=5, delay=1)
    assert not queue.app.event_queue.cancel(cancelled)  # not running here: False, but stored
    queue.drain()
    assert not of(queue.events("echo"), cancelled)
    assert len(of(queue.events("echo"), kept)) == 1
    assert CancelledMessage.objects.filter(app_name=queue.name, message_id=cancelled).exists()


def test_a_cancelled_queued_message_of_a_paused_channel_never_runs_after_resume(queue: Cluster) -> None:
    events = queue.app.event_queue
    since = Since(queue)
    events.pause("pausable")
    try:
        cancelled = events.publish("pausable", {}, timeout=5)
        kept = events.publish("pausable", {}, timeout=5)
        events.cancel(cancelled)
    finally:
        events.resume("pausable")
    queue.drain()
    assert since.ids("pausable") == [kept]


# --- pause and resume -------------------------------------------------------------------------------------------------
def test_a_paused_channel_keeps_its_messages_queued_and_resume_runs_each_once(queue: Cluster) -> None:
    events = queue.app.event_queue
    since = Since(queue)
    events.pause("pausable", by="test")
    try:
        assert events.is_paused("pausable") and events.paused_channels(fresh=True) == ["pausable"]
        ids = [events.publish("pausable", {"n": n}, timeout=5) for n in range(10)]
        # Other channels still run
        marker = events.publish("echo", {"n": "marker"}, timeout=5)
        wait_ran(queue, "echo", marker)
        # Every paused message waits in its queue (none held by a consumer), and none ran
        if events.backend.depth(events.full_channel("pausable")) is not None:
            wait_until(lambda: events.backend.depth(events.full_channel("pausable")) == 10, timeout=20)
        assert not since.ids("pausable")
        assert ChannelState.objects.get(app_name=queue.name, channel="pausable").changed_by == "test"
    finally:
        events.resume("pausable")
    queue.drain()
    assert sorted(since.ids("pausable")) == sorted(ids)


def test_pausing_an_unknown_channel_is_refused(queue: Cluster) -> None:
    from nocluster import UnknownChannel

    with pytest.raises(UnknownChannel, match="nope"):
        queue.app.event_queue.pause("nope")
