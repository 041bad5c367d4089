"""Queue handlers shared by the test process (which publishes) and the Celery workers (which run them).

Every process of a project registers the same subscriptions: the workers import ``tests.queue.worker_scenarios``
(``celery worker -I``), which calls :func:`register` on their ``nocluster.app``; the test process calls it on the
Application it publishes with. Handlers report what they did as JSON events on a Redis list
``"{app.name}:events"`` that the test reads (:func:`events`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Any

import redis

from nocluster.app import Application
from nocluster.queue.message import Context

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def events_key(name: str) -> str:
    return f"{name}:events"


def events(name: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The events handlers of project ``name`` recorded, oldest first (optionally only those of ``kind``)."""
    found = [json.loads(raw) for raw in client().lrange(events_key(name), 0, -1)]
    return [event for event in found if kind is None or event["kind"] == kind]


def of(found: list[dict[str, Any]], message_id: str) -> list[dict[str, Any]]:
    """The events of message ``message_id``."""
    return [event for event in found if event["id"] == message_id]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals ``(start, end)`` open at one instant."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


def set_idle(name: str, idle: bool) -> None:
    client().set(f"{name}:idle", "1" if idle else "0", ex=600)


def gate_asks(name: str) -> int:
    """How many times a node asked the ``gated`` channel's ``idle()`` so far."""
    return int(client().get(f"{name}:gate-asks") or 0)


def register(app: Application) -> None:
    """Subscribe every test channel of project ``app.name``."""
    name = app.name

    def record(kind: str, context: Context, **extra: Any) -> None:
        event = {
            "kind": kind,
            "id": context.id,
            "retried": context.retried,
            "pid": os.getpid(),
            "node": os.getppid(),
            "t": time.time(),
            **extra,
        }
        client().rpush(events_key(name), json.dumps(event))

    def echo(payload: Any, context: Context) -> None:
        record("echo", context, payload=payload)

    def flaky(payload: Any, context: Context) -> None:
        record("flaky", context)
        if payload.get("succeed_at") is None or context.retried < payload["succeed_at"]:
            raise RuntimeError(f"flaky failure on try {context.retried}")

    def overrun(payload: Any, context: Context) -> None:
        # Cooperative: waits longer than its timeout, but gives up when the signal fires.
        aborted = context.signal.wait(payload["sleep"])
        record("overrun", context, aborted=aborted, reason=context.signal.reason)

    def stubborn(payload: Any, context: Context) -> None:
        # Ignores its signal entirely (a blocking call, in steps so the memory backend can stop it too).
        record("stubborn-start", context)
        deadline = time.monotonic() + payload["sleep"]
        while time.monotonic() < deadline:
            time.sleep(0.05)
        record("stubborn-end", context)

    def deaf(payload: Any, context: Context) -> None:
        # Ignores its signal and even the soft time limit: only killing its process stops it.
        record("deaf-start", context)
        deadline = time.monotonic() + payload["sleep"]
        while time.monotonic() < deadline:
            with contextlib.suppress(BaseException):  # the point of this handler
                time.sleep(0.05)
        record("deaf-end", context)

    def poison(payload: Any, context: Context) -> None:
        # Ends its own process, every time (an OOM kill, a segfault, a C extension calling exit()).
        record("poison", context)
        os._exit(70)

    def kill_worker(payload: Any, context: Context) -> None:
        # Kills its whole worker, main process and pool (each test worker is a process group of its own).
        record("kill-worker", context)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    def slow(payload: Any, context: Context) -> None:
        started = time.time()
        time.sleep(payload["sleep"])
        record("slow", context, start=started, end=time.time())

    def gated(payload: Any, context: Context) -> None:
        record("gated", context, payload=payload)

    def gate() -> bool:
        client().incr(f"{name}:gate-asks")
        return client().get(f"{name}:idle") == b"1"

    def rated(payload: Any, context: Context) -> None:
        record(context.channel, context, payload=payload)  # "rated" or "rated-fast"

    def long(payload: Any, context: Context) -> None:
        record("long-start", context)
        if context.signal.wait(payload["sleep"]):
            record("long-aborted", context, reason=context.signal.reason)
            context.signal.throw_if_aborted()
        record("long-done", context)

    queue = app.event_queue
    queue.subscribe("echo", echo, concurrency=3)
    queue.subscribe("flaky", flaky, concurrency=2)
    queue.subscribe("overrun", overrun, concurrency=2)
    queue.subscribe("stubborn", stubborn, concurrency=2)
    queue.subscribe("deaf", deaf, concurrency=2)
    queue.subscribe("poison", poison)
    queue.subscribe("kill-worker", kill_worker)
    queue.subscribe("slow", slow, concurrency=2)
    queue.subscribe("gated", gated, concurrency=2, idle=gate)
    queue.subscribe("long", long, concurrency=3)

    def pausable(payload: Any, context: Context) -> None:
        record("pausable", context, payload=payload)

    def held(payload: Any, context: Context) -> None:
        # Runs until its marker key is set (or its signal fires): a unique key stays held meanwhile.
        record("held", context)
        while not client().exists(f"{name}:release:{context.id}") and not context.signal.wait(0.02):
            pass
        record("held-done", context)

    queue.subscribe("pausable", pausable, concurrency=3)
    queue.subscribe("held", held, concurrency=3)
    queue.subscribe("rated", rated, concurrency=3, rate_limit="10/s")
    queue.subscribe("rated-fast", rated, concurrency=2, rate_limit="20/s")


def publish_together(app: Application, start_at: float, count: int, unique_key: str) -> list[str]:
    """From ``count`` threads of this process, all at wall-clock time ``start_at``: publish a ``held`` message
    with ``unique_key``; return the ids publish returned."""
    import threading

    ids: list[str] = []

    def publish() -> None:
        time.sleep(max(start_at - time.time(), 0))
        ids.append(app.event_queue.publish("held", {}, timeout=5, unique_key=unique_key))

    threads = [threading.Thread(target=publish) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ids
