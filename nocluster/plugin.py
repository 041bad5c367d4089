"""Plugins: Django apps whose ``AppConfig`` names a :class:`Plugin` subclass, and the lifecycle runner.

A plugin app declares its class on the AppConfig::

    class AuthConfig(AppConfig):
        name = "plugins.auth"
        plugin_class = "plugins.auth.plugin.AuthPlugin"   # or the class itself

The runner works like ``django.apps.Apps.populate()``: phases in a fixed order, each run for every plugin in
``INSTALLED_APPS`` order before the next phase starts, idempotent, refusing re-entry, and every error names
the plugin and the hook.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, Protocol, cast

from django.apps import AppConfig, apps
from django.utils.module_loading import import_string

from nocluster.cache import Cache, CacheManager
from nocluster.envelope import JSON
from nocluster.errors import PluginError
from nocluster.install import install_once
from nocluster.locks import LockManager
from nocluster.pubsub import PubSubManager
from nocluster.queue import EventQueue
from nocluster.schedule import PeriodicJob, Scheduler
from nocluster.sync import SyncMessageManager
from nocluster.sync.manager import SyncPlugin
from nocluster.sync.sequence import resync_marker


class PluginHost(Protocol):
    """What a plugin sees of the application (``self.app``): ``nocluster.app.Application`` is one.

    Declared here, not imported, so the plugin runner does not depend on the composition root that builds it.
    """

    @property
    def name(self) -> str: ...

    @property
    def instance_id(self) -> str: ...

    @property
    def cache(self) -> Cache: ...

    @property
    def cache_manager(self) -> CacheManager: ...

    @property
    def pub_sub_manager(self) -> PubSubManager: ...

    @property
    def sync_message_manager(self) -> SyncMessageManager: ...

    @property
    def event_queue(self) -> EventQueue: ...

    @property
    def lock_manager(self) -> LockManager: ...

    @property
    def scheduler(self) -> Scheduler: ...

    @property
    def plugins(self) -> PluginRegistry: ...


class Plugin:
    """Base class of plugins. Override the hooks you need; each default does nothing.

    Hooks, run once per process unless said otherwise:
      before_load(): subscribe to channels. The plugin's sync-message subscription is made just before it,
        automatically, when the class defines ``handle_sync_message``.
      resync(reason): reload state from the database after missed sync messages (see :meth:`resync`).
      load(): register queue consumers, create caches, connect signals.
      install(): once per cluster, after ``migrate``, for first-time data.
      after_start() / before_stop(): when this node's consumers start and stop.

    Attributes:
      app: the :class:`~nocluster.app.Application` (typed as :class:`PluginHost`, what a plugin may use).
      name: the plugin name, which is the Django app label.
      app_config: the Django ``AppConfig``.
      logger: a logger named ``nocluster.plugins.<name>``.
      sync_debounce: seconds over which equal sync messages to this plugin are coalesced; None (the default)
        uses ``NOCLUSTER["SYNC"]["DEBOUNCE"]``. A plugin whose state must follow changes quickly sets less.
      schedules: periodic jobs of this plugin (:class:`~nocluster.schedule.PeriodicJob`), added to
        ``app.scheduler`` right after its ``load()`` (which subscribes their channels); or add them in ``load()``.
    """

    sync_debounce: float | None = None
    schedules: ClassVar[Sequence[PeriodicJob]] = ()

    def __init__(self, app: PluginHost, app_config: AppConfig) -> None:
        self.app = app
        self.app_config = app_config
        self.name: str = app_config.label
        self.logger = logging.getLogger(f"nocluster.plugins.{self.name}")

    def before_load(self) -> None:
        """Subscribe to channels."""

    def load(self) -> None:
        """Register queue consumers, create caches, connect signals."""

    def install(self) -> None:
        """First-time data, once per cluster (guarded: two nodes migrating at once install once)."""

    def after_start(self) -> None:
        """This node's consumers have started."""

    def before_stop(self) -> None:
        """This node's consumers are about to stop."""

    def send_sync_message(self, message: JSON, using: str | None = None) -> None:
        """Tell this plugin on every other node that its state changed.

        Sent on sync channel ``self.name`` after the current transaction on database ``using`` commits (at
        once outside a transaction; never after a rollback). Each other node calls ``handle_sync_message``.
        """
        self.app.sync_message_manager.publish(self.name, message, using=using)

    def resync(self, reason: str) -> None:
        """Reload this plugin's in-memory state from the database: this node may have missed sync messages.

        Called (in the node's sync thread) when a gap shows in the plugin's sync sequence numbers or after this
        node's pub/sub connection was re-established. The default calls ``handle_sync_message`` with the resync
        marker ``{"type": "nocluster.resync", "reason": reason}`` (see ``nocluster.sync.sequence.is_resync``);
        override it to reload everything in one go.
        """
        handler = getattr(self, "handle_sync_message", None)
        if callable(handler):
            handler(resync_marker(reason))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def plugin_class_of(app_config: AppConfig) -> type[Plugin] | None:
    """The Plugin class an AppConfig declares in ``plugin_class`` (a class or a dotted path), if any."""
    declared = getattr(app_config, "plugin_class", None)
    if declared is None:
        return None
    cls = import_string(declared) if isinstance(declared, str) else declared
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise TypeError(f"app {app_config.label!r}: plugin_class {declared!r} is not a nocluster.Plugin subclass")
    return cls


class PluginRegistry:
    """The loaded plugins, by name, in load order (``app.plugins``)."""

    def __init__(self, app: PluginHost) -> None:
        self.app = app
        self._plugins: dict[str, Plugin] = {}
        self.loaded = False
        self._loading = False
        self._lock = threading.RLock()

    # Mapping-like access.
    def __getitem__(self, name: str) -> Plugin:
        return self._plugins[name]

    def __contains__(self, name: object) -> bool:
        return name in self._plugins

    def __iter__(self) -> Iterator[Plugin]:
        return iter(list(self._plugins.values()))

    def __len__(self) -> int:
        return len(self._plugins)

    def names(self) -> list[str]:
        return list(self._plugins)

    def get(self, name: str, default: Plugin | None = None) -> Plugin | None:
        return self._plugins.get(name, default)

    def populate(self, app_configs: Iterable[AppConfig] | None = None) -> None:
        """Build every plugin, then run ``before_load`` on all, then ``load`` on all.

        Parameters:
          app_configs: the apps to load (default: every installed app, in ``INSTALLED_APPS`` order).

        Raises:
          PluginError: a hook failed; it names the plugin. The registry stays unloaded.
          RuntimeError: called again while loading (a hook re-entered the runner).
        """
        with self._lock:
            if self.loaded:
                return
            if self._loading:
                raise RuntimeError("plugins are being loaded already: a plugin hook re-entered populate()")
            self._loading = True
            try:
                # Phase 1: build every plugin object, so hooks can see each other.
                for app_config in apps.get_app_configs() if app_configs is None else app_configs:
                    cls = plugin_class_of(app_config)
                    if cls is not None:
                        self._plugins[app_config.label] = cls(self.app, app_config)
                # Phase 2: subscriptions (sync messages first), then the plugins' own.
                self._run_phase("before_load", self._before_load)
                # Phase 3: queue consumers, caches, signals; then the plugin's periodic jobs.
                self._run_phase("load", self._load)
                self.loaded = True
            except BaseException:
                self._plugins.clear()
                raise
            finally:
                self._loading = False

    def _before_load(self, plugin: Plugin) -> None:
        if callable(getattr(plugin, "handle_sync_message", None)):
            self.app.sync_message_manager.register_plugin(cast(SyncPlugin, plugin))
        plugin.before_load()

    def _load(self, plugin: Plugin) -> None:
        plugin.load()
        for job in plugin.schedules:
            self.app.scheduler.add(job)

    def _run_phase(self, hook: str, call: Callable[[Plugin], Any], plugins: Iterable[Plugin] | None = None) -> None:
        for plugin in list(self._plugins.values()) if plugins is None else plugins:
            try:
                call(plugin)
            except Exception as exc:
                raise PluginError(plugin.name, hook, exc) from exc

    def install(self) -> None:
        """Run ``install`` once per cluster for each plugin, in load order (see :mod:`nocluster.install`)."""
        self._run_phase("install", install_once)

    def after_start(self) -> None:
        self._run_phase("after_start", lambda plugin: plugin.after_start())

    def before_stop(self) -> None:
        """Run ``before_stop`` in reverse load order; every plugin gets its call even if one fails."""
        errors: list[PluginError] = []
        for plugin in reversed(list(self._plugins.values())):
            try:
                plugin.before_stop()
            except Exception as exc:
                errors.append(PluginError(plugin.name, "before_stop", exc))
        if errors:
            raise errors[0]

    def reset(self) -> None:
        """Forget every plugin (tests only)."""
        with self._lock:
            self._plugins.clear()
            self.loaded = False
