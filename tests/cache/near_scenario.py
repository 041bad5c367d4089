"""Node scenario for the two-process near-cache tests (``tests.cache.near_scenario:handle``).

Commands (JSON over stdin, see ``tests/node.py``), on the near cache ``hot`` (``create_cache(..., local=True)``):
  set {key, value}        set it; returns this node's ``time.monotonic()`` just before ``set`` and just after
  get {key}               ``get`` through the near cache
  local {key}             what the local tier holds for ``key`` (``"<missing>"`` if nothing)
  watch {key}             start a thread polling ``get(key)`` every 0.2 ms; each new value is pushed as an event
                          ``{"event": "seen", "value": v, "at": time.monotonic()}``. And check, right after each
                          invalidation of ``key`` is applied (a second subscriber of the invalidation channel, called
                          after the cache's own), that ``get(key)`` is at least ``seq - 1``: the one writer writes
                          0, 1, 2... and nothing else, so its invalidation number ``seq`` follows its write of
                          ``seq - 1``; anything less is a stale value served after its invalidation arrived.
  stale {}                the stale reads found by ``watch``: list of [seq, value read]
  state {}                {"connected", "clears"}: pub/sub consumer bound; how many times every tier was cleared
and everything ``tests.node.default_handler`` understands (``ping``, ``eval``).

CLOCK_MONOTONIC is one clock for every process of the machine, so times of two nodes compare.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from nocluster.cache.invalidation import CHANNEL
from nocluster.cache.local import MISSING
from tests.node import default_handler, emit

_stale: list[list[Any]] = []
_stopping = threading.Event()


def _near() -> Any:
    from nocluster import app

    return app.cache_manager.create_cache(name="hot", local=True)


def _watch(key: str) -> None:
    from nocluster import app

    near = _near()

    def check(message: Any) -> None:
        if key in (message.get("keys") or ()):
            value = near.get(key)
            if not isinstance(value, int) or value < message["seq"] - 1:
                _stale.append([message["seq"], value])

    app.pub_sub_manager.subscribe(CHANNEL, check)

    def poll() -> None:
        last: Any = object()
        while not _stopping.is_set():
            value = near.get(key)
            if value != last:
                emit({"event": "seen", "value": value, "at": time.monotonic()})
                last = value
            time.sleep(0.0002)

    threading.Thread(target=poll, name="near-poller", daemon=True).start()


def handle(command: dict[str, Any]) -> Any:
    from nocluster import app

    name = command["cmd"]
    if name == "set":
        near = _near()
        before = time.monotonic()
        near.set(command["key"], command["value"])
        return [before, time.monotonic()]
    if name == "get":
        return _near().get(command["key"])
    if name == "local":
        value = _near().tier.get(command["key"])
        return "<missing>" if value is MISSING else value
    if name == "watch":
        _watch(command["key"])
        return True
    if name == "stale":
        return list(_stale)
    if name == "state":
        invalidations = app.cache_manager.invalidations
        return {
            "connected": app.pub_sub_manager.backend.connected,
            "clears": invalidations.clears if invalidations is not None else 0,
        }
    return default_handler(command)
