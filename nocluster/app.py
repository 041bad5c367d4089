"""The composition root: the process-wide application builds every component and hands each what it uses.

Nothing here runs at import. Components are built on first use from ``settings.NOCLUSTER``; consumers start only
in :meth:`Application.start`, which the node runner (``manage.py runnode``), ``runserver`` and Celery worker
processes call. No manager or backend reaches for the global ``app``: each gets its collaborators here (the
node's :class:`~nocluster.identity.NodeIdentity`, the pub/sub manager, the debouncer, the lock manager...).

One ordered list, :data:`COMPONENTS`, drives start, stop (in reverse, then close) and after-fork. After
``fork()`` the child is a new node: a new instance id, and it starts its own consumers.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import cached_property
from typing import Any

from django.conf import settings

from nocluster import logs
from nocluster.cache import Cache, CacheManager
from nocluster.conf import get_config, load_backend
from nocluster.identity import NodeIdentity
from nocluster.lifecycle import Component
from nocluster.locks import LockManager
from nocluster.metrics import Metrics, MetricsSettings
from nocluster.metrics.collector import ClusterCollector
from nocluster.nodes import NodeRegistry, RegistrySettings
from nocluster.outbox import Outbox, OutboxSettings
from nocluster.plugin import PluginRegistry
from nocluster.pubsub import PubSubManager
from nocluster.pubsub.debounce import Debouncer
from nocluster.pubsub.manager import DEFAULT_MAX_MESSAGE_BYTES
from nocluster.queue import EventQueue
from nocluster.schedule import Scheduler
from nocluster.schedule.settings import ScheduleSettings
from nocluster.sync import SyncMessageManager

logger = logging.getLogger("nocluster.app")

# Every component, in start order (stopped and closed in reverse, forked in this order). The lock manager comes
# first: the others may take locks while starting and stopping. The outbox relay starts once what it sends to
# is up, and stops first. The scheduler publishes through both, so it starts after them and stops before them.
# The registry comes last: a node is shown up once it consumes.
COMPONENTS = (
    "lock_manager",
    "cache_manager",
    "pub_sub_manager",
    "sync_message_manager",
    "event_queue",
    "outbox",
    "scheduler",
    "node_registry",
)


class Application:
    """One per process (``nocluster.app``); tests may build their own with ``config``.

    Parameters:
      config: a ``NOCLUSTER``-shaped dict used instead of ``settings.NOCLUSTER`` (for tests and tools).
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self._config_override = config
        self._state_lock = threading.RLock()
        # The name is read from the settings on first use (settings may not be configured yet).
        self.identity = NodeIdentity(name="")
        self.started = False
        self.plugins = PluginRegistry(self)

    # --- names -----------------------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict[str, Any]:
        config = get_config() if self._config_override is None else {**get_config(), **self._config_override}
        self.identity.name = str(config["NAME"])
        return config

    @property
    def name(self) -> str:
        """Prefix of every channel, cache key and lock key (``NOCLUSTER["NAME"]``)."""
        return str(self.config["NAME"])

    @property
    def instance_id(self) -> str:
        """Unique per process (uuid4 hex); a forked child gets its own."""
        return self.identity.instance_id

    @property
    def role(self) -> str:
        """What the node registry shows for this process (set by :meth:`start`)."""
        return self.identity.role

    def _identity(self) -> NodeIdentity:
        self.config  # noqa: B018 (reading the config names the identity)
        return self.identity

    # --- components, built on first use -----------------------------------------------------------------
    @cached_property
    def metrics(self) -> Metrics:
        """The recorders handed to the managers (no-ops unless ``NOCLUSTER["METRICS"]["ENABLED"]``)."""
        return Metrics(MetricsSettings.from_config(self.config, self.name), self._identity())

    def metrics_settings(self) -> MetricsSettings:
        """``NOCLUSTER["METRICS"]`` as the settings say now (read per scrape, not cached)."""
        config = get_config() if self._config_override is None else {**get_config(), **self._config_override}
        return MetricsSettings.from_config(config, str(config["NAME"]))

    def metrics_collector(self) -> ClusterCollector:
        """The gauges a scrape reads from the cluster: queue channels, outbox, node registry."""
        return ClusterCollector(self.event_queue, self.outbox, self.node_registry.nodes)

    @cached_property
    def lock_manager(self) -> LockManager:
        return LockManager(self._identity(), load_backend("LOCKS", self.config), self.metrics.locks)

    @cached_property
    def cache_manager(self) -> CacheManager:
        return CacheManager(self._identity(), self.lock_manager, self.pub_sub_manager)

    @property
    def cache(self) -> Cache:
        """The default cache (``CACHES["default"]``, namespaced by ``app.name``)."""
        return self.cache_manager.default

    @cached_property
    def debouncer(self) -> Debouncer:
        """The trailing-edge debouncer of pub/sub and sync subscriptions: one named thread, started and stopped
        with the pub/sub manager (sync messages ride on pub/sub)."""
        return Debouncer(lambda: f"nocluster-debounce-{self.identity.short_id}")

    @cached_property
    def pub_sub_manager(self) -> PubSubManager:
        limit = self.config.get("PUBSUB", {}).get("MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES)
        backend = load_backend("PUBSUB", self.config)
        return PubSubManager(self._identity(), backend, self.debouncer, limit, metrics=self.metrics.pubsub)

    @property
    def pubsub(self) -> PubSubManager:
        """Alias of :attr:`pub_sub_manager`."""
        return self.pub_sub_manager

    @cached_property
    def sync_message_manager(self) -> SyncMessageManager:
        debounce = self.config.get("SYNC", {}).get("DEBOUNCE", 1.0)
        return SyncMessageManager(
            self._identity(), self.pub_sub_manager, self.debouncer, debounce, self.outbox, self.metrics.sync
        )

    @cached_property
    def event_queue(self) -> EventQueue:
        backend = load_backend("EVENT_QUEUE", self.config)
        channels = self.config["EVENT_QUEUE"].get("CHANNELS")  # NOCLUSTER_WORKER_CHANNELS
        return EventQueue(
            self._identity(),
            backend,
            self.outbox,
            rate_limiter=load_backend("RATE_LIMITS", self.config),
            channels=channels,
            metrics=self.metrics.queue,
        )

    @cached_property
    def outbox(self) -> Outbox:
        """Messages published inside a transaction, relayed after its commit (the node's relay thread)."""
        outbox = Outbox(self._identity(), OutboxSettings.from_config(self.config))
        # The relay needs its senders even in a process that never touched the queue or the sync messages.
        outbox.register(
            "queue", lambda row: self.event_queue.relay(row), send_many=lambda rows: self.event_queue.relay_many(rows),
            waits=lambda: self.event_queue.backend.publish_waits,
        )  # fmt: skip
        outbox.register(
            "sync", lambda row: self.sync_message_manager.relay(row),
            waits=lambda: self.pub_sub_manager.backend.publish_waits,
        )  # fmt: skip
        return outbox

    @cached_property
    def scheduler(self) -> Scheduler:
        """Periodic jobs: each slot runs once for the whole cluster (``NOCLUSTER["SCHEDULE"]``)."""
        return Scheduler(self._identity(), self.event_queue, ScheduleSettings.from_config(self.config))

    @cached_property
    def node_registry(self) -> NodeRegistry:
        """This node's entry in the cluster's node registry (started by :meth:`start`)."""
        return NodeRegistry(
            self._identity(), RegistrySettings.from_config(self.config), self.plugins.names, self.backend_names(),
            channels=lambda: self.event_queue.consumed_channels(),
        )  # fmt: skip

    def backend_names(self) -> dict[str, str]:
        """The configured backend class of each component, by dotted path (without building anything)."""
        sections = ("PUBSUB", "EVENT_QUEUE", "LOCKS", "RATE_LIMITS")
        names = {section.lower(): str(self.config[section]["BACKEND"]) for section in sections}
        names["cache"] = str(settings.CACHES["default"]["BACKEND"])
        return names

    def built(self, attribute: str) -> Any | None:
        """The component ``attribute`` if it was built already, else None (never builds it)."""
        return self.__dict__.get(attribute)

    def _built_components(self) -> list[Component]:
        return [component for component in map(self.built, COMPONENTS) if component is not None]

    # --- lifecycle ----------------------------------------------------------------------------------------
    def load_plugins(self) -> None:
        """Run ``before_load`` then ``load`` of every plugin in ``INSTALLED_APPS`` order (idempotent)."""
        self.plugins.populate()

    def install_plugins(self) -> None:
        """Run ``install`` of plugins not yet installed in this cluster (needs migrated tables)."""
        self.load_plugins()
        self.plugins.install()

    def start(self, role: str | None = None) -> None:
        """Start every component in :data:`COMPONENTS` order, then run every plugin's ``after_start``.

        ``role`` (``"web"``, ``"worker"``...) is what the node registry shows for this process.

        Idempotent. If a component or a plugin's ``after_start`` fails, what was started is stopped again and
        the error propagates (a :class:`~nocluster.errors.PluginError` names the plugin): a node does not
        half-start.
        """
        with self._state_lock:
            if self.started:
                return
            if role is not None:
                self.identity.role = role
            self.load_plugins()
            started: list[Component] = []
            try:
                for attribute in COMPONENTS:
                    component: Component = getattr(self, attribute)
                    component.start()
                    started.append(component)
                self.plugins.after_start()
            except BaseException:
                self._stop_components(started)
                raise
            self.started = True
            logger.info("node %s of %r started", self.instance_id, self.name)

    def stop(self) -> None:
        """Run every plugin's ``before_stop`` (reverse order), then stop and close every component (reverse)."""
        with self._state_lock:
            if not self.started:
                return
            self.started = False
            try:
                self.plugins.before_stop()
            finally:
                self._stop_components(self._built_components())
            logger.info("node %s of %r stopped", self.instance_id, self.name)

    def _stop_components(self, components: list[Component]) -> None:
        # Every component gets its stop and close even if another one fails; the first error propagates.
        errors: list[BaseException] = []
        for step in ("stop", "close"):
            for component in reversed(components):
                try:
                    getattr(component, step)()
                except Exception as exc:
                    logger.exception("%s.%s() failed on node %s", type(component).__name__, step, self.instance_id)
                    errors.append(exc)
        if errors:
            raise errors[0]

    def _after_fork_in_child(self) -> None:
        """In a forked child: become a new node (new instance id) and let every built component forget the parent's
        threads and connections. Registrations made in ``before_load``/``load`` are kept."""
        self._state_lock = threading.RLock()
        self.identity.renew()
        self.started = False
        for component in self._built_components():
            component.after_fork()


app = Application()
logs.bind_identity(app.identity)
os.register_at_fork(after_in_child=app._after_fork_in_child)
