"""Scenario handlers for lock tests in node processes (``tests.locks.scenarios:handle``).

Commands (JSON):
  ``{"cmd": "increment", "table", "count", "key", "locked", "pause", "start_at"}``: at wall-clock time
    ``start_at``, ``count`` times read the counter row, sleep ``pause`` seconds (widening the race window),
    write it back plus one; under ``app.lock_manager.run_exclusive(key, fn)`` when ``locked``. Returns
    ``[[value read, token or None], ...]``.
  ``{"cmd": "hold", "key", "ttl"}``: acquire and keep holding; returns the token.
Anything else goes to ``tests.node:default_handler``.
"""

from __future__ import annotations

import re
import time
from typing import Any

from tests.node import default_handler

_held: dict[str, Any] = {}


def _increment_once(table: str, pause: float) -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"SELECT value FROM {table} WHERE id = 1")
        (value,) = cursor.fetchone()
        time.sleep(pause)
        cursor.execute(f"UPDATE {table} SET value = %s WHERE id = 1", [value + 1])
    return int(value)


def increment(table: str, count: int, key: str, locked: bool, pause: float, start_at: float) -> list[list[Any]]:
    from nocluster import app

    if not re.fullmatch(r"[a-z0-9_]+", table):
        raise ValueError(f"bad table name {table!r}")
    time.sleep(max(0.0, start_at - time.time()))
    results: list[list[Any]] = []
    for _ in range(count):
        if locked:
            # The token of the holder: the lock names its holder's token while held.
            step = app.lock_manager.run_exclusive(
                key, lambda: [_increment_once(table, pause), app.lock_manager.get_lock(key).token], ttl=10
            )
            results.append(step)
        else:
            results.append([_increment_once(table, pause), None])
    return results


def handle(command: dict[str, Any]) -> Any:
    from nocluster import app

    if command["cmd"] == "increment":
        args = {name: command[name] for name in ("table", "count", "key", "locked", "pause", "start_at")}
        return increment(**args)
    if command["cmd"] == "hold":
        lock = app.lock_manager.acquire(command["key"], ttl=command["ttl"], timeout=30)
        _held[command["key"]] = lock
        return {"token": lock.token, "instance_id": app.instance_id, "backend": type(app.lock_manager.backend).__name__}
    return default_handler(command)
