"""``install()`` once per cluster, guarded twice: a cluster lock, then a database row lock.

The first guard is ``app.lock_manager`` (key ``"install:{plugin}"``, auto-renewed while ``install()`` runs):
nodes migrating at once take turns, so only one runs ``install()`` at a time, even on a database without row
locks. The second guard is the ``InstalledPlugin`` row itself: the first node inserts it and holds its lock
until ``install()`` has run and committed; a node that gets the lock afterwards sees the row installed and
skips. A plugin whose ``install()`` raises leaves no row, so the next start tries again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from django.db import transaction
from django.utils import timezone

from nocluster.errors import LockNotOwned
from nocluster.locks import LockManager

if TYPE_CHECKING:
    from nocluster.models import InstalledPlugin

# Seconds the install lock survives a node that dies while installing; renewed every third of it while held.
INSTALL_LOCK_TTL = 10.0


class InstallHost(Protocol):
    """The application, as installing needs it."""

    @property
    def lock_manager(self) -> LockManager: ...

    @property
    def instance_id(self) -> str: ...


class Installable(Protocol):
    """A plugin, as installing needs it (``nocluster.Plugin`` is one)."""

    name: str
    logger: logging.Logger

    @property
    def app(self) -> InstallHost: ...

    def install(self) -> None: ...


def install_once(plugin: Installable) -> bool:
    """Run ``plugin.install()`` unless this cluster ran it already. Returns True when it ran here."""
    lock = plugin.app.lock_manager.acquire(f"install:{plugin.name}", ttl=INSTALL_LOCK_TTL, auto_renew=True)
    try:
        return _install_in_transaction(plugin)
    finally:
        try:
            lock.release()
        except LockNotOwned as exc:
            # The row guard kept install() to one run; the lost lock only let another node wait less.
            plugin.logger.warning("plugin %s: install lock lost while installing: %s", plugin.name, exc)


def _installed_plugin_model() -> type[InstalledPlugin]:
    from nocluster.models import InstalledPlugin  # the app registry is ready when a plugin installs

    return InstalledPlugin


def _install_in_transaction(plugin: Installable) -> bool:
    model = _installed_plugin_model()
    with transaction.atomic():
        record, _ = model.objects.get_or_create(name=plugin.name)
        # Lock the row: a concurrent installer waits here until we commit.
        record = model.objects.select_for_update().get(pk=record.pk)
        if record.installed_at is not None:
            return False
        plugin.install()
        record.installed_at = timezone.now()
        record.installed_by = plugin.app.instance_id
        record.save(update_fields=["installed_at", "installed_by"])
        plugin.logger.info("plugin %s installed by node %s", plugin.name, plugin.app.instance_id)
        return True
