"""The process-wide application: names, managers built lazily from settings, and the node's lifecycle.

Nothing here runs at import. Managers are built on first use; consumers start only in :meth:`Application.start`,
which the node runner (``manage.py runnode``), ``runserver`` and Celery worker processes call. After ``fork()`` the
child gets a new ``instance_id`` and starts its own consumers.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from functools import cached_property
from typing import TYPE_CHECKING, Any

from django.conf import settings

from nocluster.conf import get_config, load_backend
from nocluster.plugin import PluginRegistry

if TYPE_CHECKING:
    from nocluster.cache import Cache, CacheManager
    from nocluster.locks import LockManager
    from nocluster.nodes import NodeRegistry
    from nocluster.pubsub import PubSubManager
    from nocluster.queue import EventQueue
    from nocluster.sync import SyncMessageManager

logger = logging.getLogger("nocluster.app")

# Managers with connections or threads; started and stopped in this order (stopped in reverse).
RUNNING_MANAGERS = ("pub_sub_manager", "event_queue", "node_registry")


class Application:
    """One per process (``nocluster.app``); tests may build their own with ``config``.

    Parameters:
      config: a ``NOCLUSTER``-shaped dict used instead of ``settings.NOCLUSTER`` (for tests and tools).
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self._config_override = config
        self._state_lock = threading.RLock()
        self._instance_id = uuid.uuid4().hex
        self.started = False
        self.role = "node"
        self.plugins = PluginRegistry(self)

    # --- names -----------------------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict[str, Any]:
        if self._config_override is not None:
            return {**get_config(), **self._config_override}
        return get_config()

    @cached_property
    def name(self) -> str:
        """Prefix of every channel, cache key and lock key (``NOCLUSTER["NAME"]``)."""
        return str(self.config["NAME"])

    @property
    def instance_id(self) -> str:
        """Unique per process (uuid4 hex); a forked child gets its own."""
        return self._instance_id

    # --- managers, built on first use -------------------------------------------------------------------
    @cached_property
    def cache_manager(self) -> CacheManager:
        from nocluster.cache import CacheManager

        return CacheManager(self)

    @property
    def cache(self) -> Cache:
        """The default cache (``CACHES["default"]``, namespaced by ``app.name``)."""
        return self.cache_manager.default

    @cached_property
    def pub_sub_manager(self) -> PubSubManager:
        from nocluster.pubsub import PubSubManager

        return PubSubManager(self, load_backend("PUBSUB", self.config))

    @property
    def pubsub(self) -> PubSubManager:
        """Alias of :attr:`pub_sub_manager`."""
        return self.pub_sub_manager

    @cached_property
    def sync_message_manager(self) -> SyncMessageManager:
        from nocluster.sync import SyncMessageManager

        return SyncMessageManager(self)

    @cached_property
    def event_queue(self) -> EventQueue:
        from nocluster.queue import EventQueue

        return EventQueue(self, load_backend("EVENT_QUEUE", self.config))

    @cached_property
    def lock_manager(self) -> LockManager:
        from nocluster.locks import LockManager

        return LockManager(self, load_backend("LOCKS", self.config))

    @cached_property
    def node_registry(self) -> NodeRegistry:
        """This node's entry in the cluster's node registry (started by :meth:`start`)."""
        from nocluster.nodes import NodeRegistry

        return NodeRegistry(self)

    def backend_names(self) -> dict[str, str]:
        """The configured backend class of each component, by dotted path (without building anything)."""
        sections = ("PUBSUB", "EVENT_QUEUE", "LOCKS")
        names = {section.lower(): str(self.config[section]["BACKEND"]) for section in sections}
        names["cache"] = str(settings.CACHES["default"]["BACKEND"])
        return names

    def built(self, attribute: str) -> Any | None:
        """The manager ``attribute`` if it was built already, else None (never builds it)."""
        return self.__dict__.get(attribute)

    # --- lifecycle ----------------------------------------------------------------------------------------
    def load_plugins(self) -> None:
        """Run ``before_load`` then ``load`` of every plugin in ``INSTALLED_APPS`` order (idempotent)."""
        self.plugins.populate()

    def install_plugins(self) -> None:
        """Run ``install`` of plugins not yet installed in this cluster (needs migrated tables)."""
        self.load_plugins()
        self.plugins.install()

    def start(self, role: str | None = None) -> None:
        """Start this process's consumers, then run every plugin's ``after_start``.

        ``role`` (``"web"``, ``"worker"``...) is what the node registry shows for this process.

        Idempotent. If a plugin fails in ``after_start``, what was started is stopped again and the
        :class:`~nocluster.errors.PluginError` propagates: a node does not half-start.
        """
        with self._state_lock:
            if self.started:
                return
            if role is not None:
                self.role = role
            self.load_plugins()
            started: list[Any] = []
            try:
                for attribute in RUNNING_MANAGERS:
                    manager = getattr(self, attribute)
                    manager.start()
                    started.append(manager)
                self.plugins.after_start()
            except BaseException:
                for manager in reversed(started):
                    manager.stop()
                raise
            self.started = True
            logger.info("node %s of %r started", self.instance_id, self.name)

    def stop(self) -> None:
        """Run every plugin's ``before_stop`` (reverse order), then stop consumers and close connections."""
        with self._state_lock:
            if not self.started:
                return
            self.started = False
            try:
                self.plugins.before_stop()
            finally:
                for attribute in reversed(RUNNING_MANAGERS):
                    manager = self.built(attribute)
                    if manager is not None:
                        manager.stop()
            logger.info("node %s of %r stopped", self.instance_id, self.name)

    def _after_fork_in_child(self) -> None:
        # Threads do not survive fork(): the child is a new node with its own id and must start its own
        # consumers. Managers keep their registrations (subscriptions made in before_load/load).
        self._state_lock = threading.RLock()
        self._instance_id = uuid.uuid4().hex
        self.started = False
        for attribute in ("pub_sub_manager", "event_queue", "lock_manager", "sync_message_manager", "node_registry"):
            manager = self.built(attribute)
            if manager is not None and hasattr(manager, "after_fork"):
                manager.after_fork()


app = Application()
os.register_at_fork(after_in_child=app._after_fork_in_child)
