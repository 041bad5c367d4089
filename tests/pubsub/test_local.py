"""What only the in-process backend and the debouncer show: no delivery to stopped instances, and a steady
stream of equal messages that still gets through."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from nocluster import Application
from nocluster.envelope import Envelope
from nocluster.pubsub.debounce import MAX_WAIT_FACTOR, Debouncer
from nocluster.testing import drain
from tests.pubsub.test_contract import Inbox

LOCAL = "nocluster.pubsub.backends.local.LocalPubSubBackend"


def local_app(bus: str) -> Application:
    return Application({"NAME": bus, "PUBSUB": {"BACKEND": LOCAL, "OPTIONS": {"bus": bus}}})


def test_an_instance_that_is_not_started_receives_nothing_and_drain_waits_for_the_rest(app_name: str) -> None:
    started, stopped, publisher = local_app(app_name), local_app(app_name), local_app(app_name)
    got, missed = Inbox(), Inbox()
    started.pub_sub_manager.subscribe("c", got)
    stopped.pub_sub_manager.subscribe("c", missed)
    started.pub_sub_manager.start()
    try:
        for n in range(100):
            publisher.pub_sub_manager.publish("c", n)
        drain(started, stopped)
        assert got.items == list(range(100))
        assert missed.items == []
    finally:
        started.pub_sub_manager.stop()


def test_a_steady_stream_of_equal_messages_is_still_delivered() -> None:
    # Given a 0.1 s debounce and an equal message pushed every 0.02 s for 1 s (never a 0.1 s pause)
    debouncer = Debouncer("test-debounce")
    calls: list[float] = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < 1.0:
            debouncer.push("key", 0.1, lambda: calls.append(time.monotonic()))
            time.sleep(0.02)
        # Then calls were made during the stream, at most MAX_WAIT_FACTOR * delay apart (plus scheduling slack)
        assert calls, "a steady stream starved the debounced callback"
        assert calls[0] - started <= 0.1 * MAX_WAIT_FACTOR + 0.3
    finally:
        debouncer.stop()


def test_stop_drops_pending_calls_and_joins_the_thread() -> None:
    debouncer = Debouncer("test-debounce-stop")
    calls: list[int] = []
    debouncer.push("key", 0.5, lambda: calls.append(1))
    thread = debouncer._thread
    debouncer.stop()
    # The pending call is gone and the only thread that could run it has exited: it can never run
    assert thread is not None and not thread.is_alive()
    assert debouncer.idle() and calls == []
    assert not any(t.name == "test-debounce-stop" for t in threading.enumerate())
    # And a push after stop is dropped, not queued for a thread that would start again
    debouncer.push("key", 0.01, lambda: calls.append(2))
    assert debouncer.idle() and debouncer._thread is None


def test_a_message_claiming_this_instance_s_id_without_coming_from_it_is_logged(
    app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    node, other = local_app(app_name), local_app(app_name)
    inbox = Inbox()
    node.pub_sub_manager.subscribe("c", inbox)
    node.pub_sub_manager.start()
    try:
        with caplog.at_level(logging.WARNING, logger="nocluster.pubsub"):
            # Its own message, sent to itself too: not suspicious
            node.pub_sub_manager.publish("c", "mine", skip_self=False)
            # Another instance that puts this instance's id on its envelope
            forged = Envelope(publisher_id=node.instance_id, message="forged", skip_self=False)
            other.pub_sub_manager.backend.publish(node.pub_sub_manager.full_channel("c"), forged.to_json())
            drain(node, other)
        claims = [r.getMessage() for r in caplog.records if "claims to come from this instance" in r.getMessage()]
        assert len(claims) == 1 and forged.id in claims[0]
        assert sorted(inbox.items) == ["forged", "mine"]  # delivered all the same: the broker's users are trusted
    finally:
        node.pub_sub_manager.stop()
