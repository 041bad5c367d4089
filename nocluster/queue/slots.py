"""Per-node concurrency for prefork workers: a counting semaphore made of file locks. Ours, and why:

A Celery worker's pool processes share nothing in memory, so "at most N ``process`` calls of this channel at
once on this node" needs a semaphore outside them. We use N lock files per (app, node, channel) in the
temporary directory and ``flock`` one of them non-blocking while the work runs. The kernel releases a lock
when its process dies, even by SIGKILL or a hard time limit, so no permit ever leaks and no server is needed
(a Redis semaphore would need a lease and a cleanup of dead holders). The node is the Celery worker name
(``-n``), so two workers on one host are two nodes.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name)[:100] or "_"


@lru_cache(maxsize=256)
def slot_directory(app_name: str, node: str) -> Path:
    """The lock files' folder of ``app_name`` on ``node`` (created on first use)."""
    directory = Path(tempfile.gettempdir()) / "nocluster-slots" / _safe(app_name) / _safe(node)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@contextmanager
def node_slot(app_name: str, node: str, channel: str, concurrency: int) -> Iterator[int | None]:
    """Hold one of ``concurrency`` slots of ``channel`` on ``node``; yields its number, or None if all are taken."""
    directory = slot_directory(app_name, node)
    for number in range(concurrency):
        fd = os.open(directory / f"{_safe(channel)}.{number}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield number
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    yield None
