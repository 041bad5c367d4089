"""The node registry: every node process (web, worker) registers itself and heartbeats in the database.

Why the database and not the cache: it is the one store every node of a cluster always shares (the cache may be
process-local on a node started with defaults), the admin lists and filters it like any model, and it survives
a Redis restart. The cost is one ``UPDATE`` per node per heartbeat (default every 5 s).

A node whose last heartbeat is older than ``GONE_AFTER`` is shown as gone; any node's heartbeat removes rows
older than ``REMOVE_AFTER``. A node that stops gracefully marks itself stopped at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.utils import timezone

from nocluster.db import close_old_connections
from nocluster.durations import seconds
from nocluster.identity import NodeIdentity
from nocluster.lifecycle import Component

if TYPE_CHECKING:
    from nocluster.models import Node

logger = logging.getLogger("nocluster.nodes")

DEFAULTS = {"ENABLED": True, "HEARTBEAT": 5.0, "GONE_AFTER": 15.0, "REMOVE_AFTER": 300.0}


@dataclass(frozen=True)
class RegistrySettings:
    """``NOCLUSTER["NODES"]``, in seconds."""

    enabled: bool
    heartbeat: float
    gone_after: float
    remove_after: float

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RegistrySettings:
        values = {**DEFAULTS, **config.get("NODES", {})}
        settings = cls(
            bool(values["ENABLED"]),
            *(
                seconds(values[key], f'NOCLUSTER["NODES"]["{key}"]', allow_zero=True)
                for key in ("HEARTBEAT", "GONE_AFTER", "REMOVE_AFTER")
            ),
        )
        if not 0 < settings.heartbeat < settings.gone_after < settings.remove_after:
            raise ValueError(
                'NOCLUSTER["NODES"] needs 0 < HEARTBEAT < GONE_AFTER < REMOVE_AFTER (seconds), got '
                f"{settings.heartbeat}, {settings.gone_after}, {settings.remove_after}"
            )
        return settings


def node_state(node: Node, now: datetime, gone_after: float) -> str:
    """``"up"``, ``"stopped"`` (stopped gracefully) or ``"gone"`` (no heartbeat for ``gone_after`` seconds)."""
    if node.stopped_at is not None:
        return "stopped"
    return "up" if node.last_heartbeat >= now - timedelta(seconds=gone_after) else "gone"


class NodeRegistry(Component):
    """This process's entry in the registry (``app.node_registry``), and queries over all entries.

    ``start()`` registers the node (with the identity's role) and starts the heartbeat thread
    ``nocluster-heartbeat``; ``stop()`` marks it stopped. Database errors in the heartbeat are logged and retried
    on the next beat: a database outage does not take the node down.

    Parameters:
      identity: this node (name, instance id, role).
      settings: ``NOCLUSTER["NODES"]``.
      plugins: returns the names of the loaded plugins (recorded with the node).
      backends: the configured backend of each component (recorded with the node).
      channels: returns the event queue channels this node consumes (recorded with the node; default none).
    """

    def __init__(
        self,
        identity: NodeIdentity,
        settings: RegistrySettings,
        plugins: Callable[[], list[str]],
        backends: dict[str, str],
        channels: Callable[[], list[str]] | None = None,
    ) -> None:
        self.identity = identity
        self.settings = settings
        self.plugins = plugins
        self.backends = backends
        self.channels = channels or list
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- this node ------------------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.settings.enabled or self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="nocluster-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(10)
        if self._thread.is_alive():
            logger.warning("heartbeat thread did not stop within 10 s")
        self._thread = None
        try:
            self._model().objects.filter(instance_id=self.identity.instance_id).update(stopped_at=timezone.now())
        except Exception:
            logger.exception("could not mark node %s stopped", self.identity.instance_id)

    def after_fork(self) -> None:
        self._thread = None
        self._stopping = threading.Event()

    def register(self) -> None:
        """Create or refresh this node's row."""
        now = timezone.now()
        self._model().objects.update_or_create(
            instance_id=self.identity.instance_id,
            defaults={
                "app_name": self.identity.name,
                "role": self.identity.role,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "plugins": self.plugins(),
                "backends": self.backends,
                "channels": self.channels(),
                "started_at": now,
                "last_heartbeat": now,
                "stopped_at": None,
            },
        )

    def beat(self) -> None:
        """One heartbeat: refresh this node (re-registering if its row was removed) and remove long-gone ones."""
        model = self._model()
        now = timezone.now()
        if not model.objects.filter(instance_id=self.identity.instance_id).update(last_heartbeat=now):
            self.register()
        model.objects.filter(last_heartbeat__lt=now - timedelta(seconds=self.settings.remove_after)).delete()

    def _run(self) -> None:
        first = True
        while not self._stopping.is_set():
            try:
                self.register() if first else self.beat()
                first = False
            except Exception:
                logger.exception("node registry heartbeat failed; retrying in %s s", self.settings.heartbeat)
            finally:
                close_old_connections()
            self._stopping.wait(self.settings.heartbeat)

    # --- every node -------------------------------------------------------------------------------------------
    def nodes(self) -> list[dict[str, Any]]:
        """Every registered node of this ``app.name`` with its ``state``, newest first."""
        now = timezone.now()
        rows = self._model().objects.filter(app_name=self.identity.name).order_by("-started_at")
        return [{**row.as_dict(), "state": node_state(row, now, self.settings.gone_after)} for row in rows]

    @staticmethod
    def _model() -> type[Node]:
        from nocluster.models import Node

        return Node
