"""The async task manager plugin: long jobs with progress, cancellable from any node, run on the event queue."""

from __future__ import annotations

from typing import Any

from nocluster import Plugin
from plugins.async_task_manager.jobs import checksum
from tasks import api as tasks
from tasks.models import Task


class AsyncTaskManagerPlugin(Plugin):
    """Registers the ``checksum`` task type (two at once per node) and submits jobs of it."""

    CHECKSUM = "checksum"

    def load(self) -> None:
        tasks.register(self, self.CHECKSUM, checksum, concurrency=2)

    def submit_checksum(self, rounds: int = 100, pause: float = 0.05, timeout: float = 15.0, **params: Any) -> Task:
        """Queue a checksum job of ``rounds`` steps, ``pause`` seconds apart; returns its :class:`Task`."""
        return tasks.submit(
            self.name,
            self.CHECKSUM,
            {"rounds": rounds, "pause": pause, **params},
            title=f"Checksum of {rounds} blocks",
            timeout=timeout,
            app=self.app,
        )
