"""Node scenario for the multi-node pub/sub, sync and data_source_main tests (``tests.pubsub.scenario:handle``).

Commands (JSON over stdin, see ``tests/node.py``):
  subscribe {channel, key, debounce=0, fail_on=None, stamp=False}
                                                        record what arrives under ``key``; raise on ``fail_on``;
                                                        with ``stamp``, each as [message, time.time() on arrival]
  unsubscribe {channel, key}
  publish {channel, message, skip_self=True, only_self=False}
  burst {channel, count, size}                          publish ``count`` messages {"n": i, "pad": size bytes}
  stream_start {channel, interval=0.005}               publish {"n": 0, 1, ...} (skip_self False) from a thread,
                                                        one every ``interval`` s, until stream_stop
  stream_progress                                       {"confirmed": how many publish() calls returned, "failed": ...}
  stream_stop                                           stop; {"confirmed": [[n, time returned], ...],
                                                        "failed": [[n, time raised], ...]}
  received {key}                                        what arrived under ``key`` (list)
  count {key}                                           how many arrived under ``key``
  sync_channel {channel, key}                           record sync messages (and resyncs) under ``key``
  reconnects                                            how many times this node's pub/sub reconnected
  ds {method, args, kwargs}                             call a data_source_main plugin method
  ds_state                                              {"registry": ..., "database": ...}
  ds_with_callback {method, args, kwargs, key}          the ``ds`` call inside one transaction that also
                                                        registers an on_commit callback recording under ``key``
  outbox                                                this node's outbox backlog
and everything ``tests.node.default_handler`` understands (``ping``, ``eval``).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

from tests.node import default_handler

_lock = threading.Lock()
_received: dict[str, list[Any]] = defaultdict(list)
_callbacks: dict[tuple[str, str], Any] = {}
_reconnects = [0]
_hooked = [False]
_stream: dict[str, Any] = {}


def _recorder(key: str, fail_on: Any = None, stamp: bool = False) -> Any:
    def record(message: Any) -> None:
        with _lock:
            _received[key].append([message, time.time()] if stamp else message)
        if fail_on is not None and message == fail_on:
            raise RuntimeError(f"scenario callback {key} fails on {message!r} on purpose")

    return record


def _count_reconnect() -> None:
    _reconnects[0] += 1


def _publish_stream(channel: str, interval: float, stopping: threading.Event) -> None:
    """Publish {"n": 0, 1, ...} until ``stopping``; note which publish() calls returned (confirmed) or raised."""
    from nocluster import app
    from nocluster.errors import PublishError

    n = 0
    while not stopping.is_set():
        try:
            app.pub_sub_manager.publish(channel, {"n": n}, skip_self=False)
        except PublishError:
            _stream["failed"].append([n, time.time()])
        else:
            _stream["confirmed"].append([n, time.time()])
        n += 1
        stopping.wait(interval)


def handle(command: dict[str, Any]) -> Any:
    from nocluster import app

    if not _hooked[0]:
        app.pub_sub_manager.on_reconnect(_count_reconnect)
        _hooked[0] = True
    cmd = command["cmd"]
    pubsub = app.pub_sub_manager
    if cmd == "subscribe":
        callback = _callbacks.setdefault(
            (command["channel"], command["key"]),
            _recorder(command["key"], command.get("fail_on"), command.get("stamp", False)),
        )
        pubsub.subscribe(command["channel"], callback, debounce=command.get("debounce", 0))
        return True
    if cmd == "unsubscribe":
        pubsub.unsubscribe(command["channel"], _callbacks[(command["channel"], command["key"])])
        return True
    if cmd == "publish":
        return pubsub.publish(
            command["channel"],
            command["message"],
            skip_self=command.get("skip_self", True),
            only_self=command.get("only_self", False),
        )
    if cmd == "burst":
        pad = "x" * command.get("size", 0)
        for n in range(command["count"]):
            pubsub.publish(command["channel"], {"n": n, "pad": pad})
        return command["count"]
    if cmd == "stream_start":
        stopping = threading.Event()
        thread = threading.Thread(
            target=_publish_stream, args=(command["channel"], command.get("interval", 0.005), stopping),
            name="scenario-stream", daemon=True,
        )  # fmt: skip
        _stream.update(confirmed=[], failed=[], stopping=stopping, thread=thread)
        thread.start()
        return True
    if cmd == "stream_progress":
        return {"confirmed": len(_stream["confirmed"]), "failed": len(_stream["failed"])}
    if cmd == "stream_stop":
        _stream["stopping"].set()
        _stream["thread"].join(60)
        return {"confirmed": _stream["confirmed"], "failed": _stream["failed"]}
    if cmd == "received":
        with _lock:
            return list(_received[command["key"]])
    if cmd == "count":
        with _lock:
            return len(_received[command["key"]])
    if cmd == "sync_channel":
        callback = _callbacks.setdefault(("sync", command["key"]), _recorder(command["key"]))
        app.sync_message_manager.subscribe(command["channel"], callback)
        return True
    if cmd == "reconnects":
        return _reconnects[0]
    if cmd == "ds":
        plugin = app.plugins["data_source_main"]
        return getattr(plugin, command["method"])(*command.get("args", []), **command.get("kwargs", {}))
    if cmd == "ds_with_callback":
        from django.db import transaction

        plugin = app.plugins["data_source_main"]
        with transaction.atomic():
            getattr(plugin, command["method"])(*command.get("args", []), **command.get("kwargs", {}))
            transaction.on_commit(lambda: _recorder(command["key"])("callback ran"))
        return True
    if cmd == "outbox":
        return app.outbox.backlog()
    if cmd == "ds_state":
        plugin = app.plugins["data_source_main"]
        return {"registry": plugin.registry.snapshot(), "database": plugin.database_schema()}
    return default_handler(command)
