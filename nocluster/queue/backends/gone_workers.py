"""On Redis: which worker holds which delivery, and a gone worker's deliveries put back on their queues at once.

kombu's Redis transport keeps every delivered, unacknowledged message in one hash (``unacked``) and hands it out
again only once it is older than the visibility timeout, which must outlast the longest run (1,620 s with the
default limits): a killed worker's message waited that long. Here:

- Each worker keeps its deliveries in hashes of its own: kombu's ``unacked_key``, ``unacked_index_key`` and
  ``unacked_mutex_key`` options, set per worker (:func:`worker_transport_options`), so kombu itself records who
  holds what, at no cost per message.
- Each worker says it is alive with a key that expires ``gone_after + heartbeat`` seconds after its last beat
  (a worker paused for less than ``gone_after`` is never taken for gone), and lists itself in ``WORKERS_KEY``.
- Every worker, once a second (or every heartbeat, if shorter), looks for listed workers whose key has expired,
  and puts their deliveries back on their queues with kombu's own ``QoS.restore_visible`` (the message marked
  redelivered, so ``max_deliveries`` counts it), under kombu's mutex of that worker's hash, so one worker does it.

The first beat is before the worker consumes (``celeryd_after_setup``); then both run on a thread of the worker's
main process (``nocluster-gone-workers``), from ``worker_ready`` until ``worker_shutdown``, so the beat goes on
while a warm shutdown waits for running work.

A message of a killed worker runs again about ``gone_after`` + ``heartbeat`` seconds later (20 s by default). The
visibility timeout stays, on each worker's own hash, as the last resort.

Liveness is a key in the broker, not the node registry's row in the database: a database outage would make every
worker look gone at once, while a worker that cannot reach the broker cannot hold its deliveries anyway (Celery
cancels its running work when the broker connection is lost).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from kombu import Connection

logger = logging.getLogger("nocluster.queue.celery")

# Under the project's ``global_keyprefix``: instance id -> who (hostname, pid, started), for every worker whose
# deliveries have hashes of their own; and each worker's liveness key.
WORKERS_KEY = "nocluster.workers"
ALIVE_KEY = "nocluster.worker.{}"
# kombu's keys, as the transport names them by default (messages delivered by a worker of an earlier version).
SHARED_KEYS = ("unacked", "unacked_index", "unacked_mutex")
SHARED_UNACKED_KEY = SHARED_KEYS[0]
# A gone worker's deliveries are restored whatever their age: they are stamped with that worker's clock, which may
# run ahead of ours, so the "visibility timeout" of the restoring channel reaches this far into the future.
RESTORE_ALL = -86_400.0
# Seconds between two looks for gone workers; between two scans for unlisted workers' hashes.
RESTORE_INTERVAL = 1.0
UNLISTED_SCAN_EVERY = 30.0
# The longest a Redis command of the beat may take (or the heartbeat, if shorter).
SOCKET_TIMEOUT = 5.0
# Forget a worker only if it holds nothing and is not alive, in one step (it may have come back meanwhile).
FORGET_IF_GONE = """
if redis.call('ZCARD', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.call('HDEL', KEYS[3], ARGV[1])
end
return 0
"""


@dataclass(frozen=True)
class Liveness:
    """When a worker counts as gone (``NOCLUSTER["NODES"]``: ``HEARTBEAT`` and ``GONE_AFTER``, in seconds)."""

    heartbeat: float = 5.0
    gone_after: float = 15.0

    @property
    def expires(self) -> float:
        """Seconds the liveness key outlives a beat: a worker paused for under ``gone_after`` is still alive."""
        return self.gone_after + self.heartbeat


def worker_transport_options(instance_id: str) -> dict[str, str]:
    """kombu's Redis options that keep the deliveries of worker ``instance_id`` in hashes of its own."""
    return {
        "unacked_key": f"unacked.{instance_id}",
        "unacked_index_key": f"unacked_index.{instance_id}",
        "unacked_mutex_key": f"unacked_mutex.{instance_id}",
    }


class GoneWorkers:
    """This worker's beat, and the restore of every gone worker's deliveries (both in the worker's main process).

    Parameters:
      connect: a kombu Connection to the broker with the project's transport options updated by the given ones.
      instance_id: this worker's main process (its own hashes and liveness key).
      liveness: when a worker counts as gone.
    """

    def __init__(self, connect: Callable[[dict[str, Any]], Connection], instance_id: str, liveness: Liveness) -> None:
        self.connect = connect
        self.instance_id = instance_id
        self.liveness = liveness
        self.about = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
        self._connection: Connection | None = None
        self._last_beat = 0.0
        self._last_scan = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self) -> None:
        """The first beat, before the worker takes any message (its deliveries are then found if it dies)."""
        self.tick()

    def start(self) -> None:
        """Start the thread (``worker_ready``, once the pool has forked its first processes; a process forked
        later copies no thread, and never uses the connection it inherits)."""
        if self._thread is None:
            self.tick()
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="nocluster-gone-workers", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and forget this worker (``worker_shutdown``: its work is finished or handed back)."""
        if self._thread is not None:
            self._stopping.set()
            self._thread.join(5)
            self._thread = None
            self.forget_self()

    def _run(self) -> None:
        while not self._stopping.wait(min(RESTORE_INTERVAL, self.liveness.heartbeat)):
            self.tick()

    # --- every RESTORE_INTERVAL ------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Beat if a heartbeat is due, then restore what gone workers held. Broker errors are logged, not raised."""
        try:
            client, prefix = self._client()
            self._beat_if_due(client, prefix)
            self.restore_gone(client, prefix)
        except Exception as exc:
            logger.warning("queue: could not beat or look for gone workers: %s: %s", type(exc).__name__, exc)
            self.close()

    def _beat_if_due(self, client: redis.Redis, prefix: str) -> None:
        if time.monotonic() - self._last_beat >= self.liveness.heartbeat:
            self.beat(client, prefix)
            self._last_beat = time.monotonic()

    def beat(self, client: redis.Redis, prefix: str) -> None:
        """Say this worker is alive for the next ``liveness.expires`` seconds."""
        with client.pipeline() as pipe:
            pipe.set(prefix + ALIVE_KEY.format(self.instance_id), self.about, px=int(self.liveness.expires * 1000))
            pipe.hset(prefix + WORKERS_KEY, self.instance_id, self.about)
            pipe.execute()

    def restore_gone(self, client: redis.Redis, prefix: str) -> int:
        """Put back every delivery of every gone worker; how many were put back (not counting the shared hash's).

        The workers looked at are those listed, and every ``UNLISTED_SCAN_EVERY`` seconds also any worker whose
        hash exists unlisted (a worker whose first beat failed, or one that held a message again after it was
        forgotten)."""
        listed = {text(key): text(about) for key, about in client.hgetall(prefix + WORKERS_KEY).items()}
        if time.monotonic() - self._last_scan >= UNLISTED_SCAN_EVERY:
            self._last_scan = time.monotonic()
            for worker in unlisted_workers(client, prefix, listed):
                listed[worker] = ""
        others = sorted(worker for worker in listed if worker != self.instance_id)
        gone: list[str] = []
        if others:
            with client.pipeline(transaction=False) as pipe:
                for worker in others:
                    pipe.exists(prefix + ALIVE_KEY.format(worker))
                alive = pipe.execute()
            gone = [worker for worker, up in zip(others, alive, strict=True) if not up]
        restored = 0
        for worker in gone:
            self._beat_if_due(client, prefix)  # a long restore must not make this worker look gone
            restored += self.restore(client, prefix, worker, listed[worker])
        self.restore_shared(client, prefix)
        return restored

    def restore_shared(self, client: redis.Redis, prefix: str) -> None:
        """Messages in kombu's shared hash (held by a worker of an earlier version): restored as kombu would, after
        the visibility timeout, since no worker of this version scans that hash."""
        if not client.hlen(prefix + SHARED_UNACKED_KEY):
            return
        keys = ("unacked_key", "unacked_index_key", "unacked_mutex_key")
        with self._connect({key: default for key, default in zip(keys, SHARED_KEYS, strict=True)}) as connection:
            connection.default_channel.qos.restore_visible(start=0, num=None, interval=1)

    def restore(self, client: redis.Redis, prefix: str, worker: str, about: str = "") -> int:
        """Put back the deliveries of ``worker`` with kombu's restore path, then forget the worker once none is left."""
        index = prefix + worker_transport_options(worker)["unacked_index_key"]
        held = int(client.zcard(index))
        if held:
            options = {**worker_transport_options(worker), "visibility_timeout": RESTORE_ALL}
            with self._connect(options) as connection:
                connection.default_channel.qos.restore_visible(start=0, num=None, interval=1)
        left = int(client.zcard(index))
        if left == 0:
            forget_if_gone(client, prefix, worker)
        restored = held - left
        if restored > 0:
            logger.warning(
                "queue: worker %s (%s) is gone; put back %d message(s) it held on their queues",
                worker, about or "?", restored, extra={"gone_worker": worker},
            )  # fmt: skip
        return max(restored, 0)

    def forget_self(self) -> None:
        """After the worker stopped (its work finished, or handed back by kombu): remove this worker's entries."""
        try:
            client, prefix = self._client()
            client.delete(prefix + ALIVE_KEY.format(self.instance_id))
            if not client.zcard(prefix + worker_transport_options(self.instance_id)["unacked_index_key"]):
                client.hdel(prefix + WORKERS_KEY, self.instance_id)
        except Exception as exc:
            logger.warning("queue: could not remove worker %s from the broker: %s", self.instance_id, exc)
        finally:
            self.close()

    # --- the connection ------------------------------------------------------------------------------------------
    def _client(self) -> tuple[redis.Redis, str]:
        if self._connection is None:
            self._connection = self._connect({})
        return plain_client(self._connection)

    def _connect(self, options: dict[str, Any]) -> Connection:
        """A connection whose commands time out: a half-open socket must not stop this worker's beat for ever."""
        timeout = min(self.liveness.heartbeat, SOCKET_TIMEOUT)
        return self.connect({"socket_timeout": timeout, "socket_connect_timeout": timeout, **options})

    def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                connection.release()
            except Exception:
                logger.debug("queue: closing the gone-worker connection failed", exc_info=True)


def forget_if_gone(client: redis.Redis, prefix: str, worker: str) -> None:
    index = prefix + worker_transport_options(worker)["unacked_index_key"]
    client.eval(FORGET_IF_GONE, 3, index, prefix + ALIVE_KEY.format(worker), prefix + WORKERS_KEY, worker)


def unlisted_workers(client: redis.Redis, prefix: str, listed: dict[str, str]) -> list[str]:
    """Workers with a hash of deliveries that are not listed."""
    start = len(prefix) + len("unacked_index.")
    found = {text(key)[start:] for key in client.scan_iter(match=prefix + "unacked_index.*", count=500)}
    return sorted(found - set(listed))


def held_deliveries(client: redis.Redis, prefix: str) -> int:
    """Messages every worker of the project holds (running, prefetched or waiting out a countdown)."""
    workers = [text(key) for key in client.hkeys(prefix + WORKERS_KEY)]
    keys = [prefix + SHARED_UNACKED_KEY] + [prefix + worker_transport_options(w)["unacked_key"] for w in workers]
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hlen(key)
        return sum(pipe.execute())


def plain_client(connection: Connection) -> tuple[redis.Redis, str]:
    """A plain redis client on the kombu connection's pool, and the project's key prefix, to be added explicitly:
    kombu's prefixing client prefixes the keys of the commands kombu itself sends, not of every command."""
    channel: Any = connection.default_channel
    return redis.Redis(connection_pool=channel.pool), str(getattr(channel, "global_keyprefix", "") or "")


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
