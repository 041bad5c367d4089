"""The long jobs of the async task manager plugin: plain functions ``fn(params, task)``."""

from __future__ import annotations

import hashlib
from typing import Any

from tasks.api import TaskContext


def checksum(params: Any, task: TaskContext) -> dict[str, Any]:
    """Hash ``rounds`` blocks of ``block`` bytes, pausing ``pause`` seconds between blocks; report progress.

    A stand-in for an export or an import: long, steady, interruptible. Stops at once when the task is
    cancelled (from any node) or times out. Returns ``{"rounds", "sha256"}``.
    """
    params = params or {}
    rounds = int(params.get("rounds", 100))
    block = int(params.get("block", 4096))
    pause = float(params.get("pause", 0.05))
    digest = hashlib.sha256()
    for done in range(1, rounds + 1):
        digest.update(done.to_bytes(8, "big") * (block // 8))
        task.progress(100 * done / rounds)
        if task.signal.wait(pause):
            task.signal.throw_if_aborted()
    return {"rounds": rounds, "sha256": digest.hexdigest()}
