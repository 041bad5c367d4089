"""``install()`` once per cluster, guarded by a database row lock.

The guard is the ``InstalledPlugin`` row itself: the first node inserts it and holds its lock until
``install()`` has run and committed; a second node migrating at the same time blocks on the row and then sees
it installed. A plugin whose ``install()`` raises leaves no row, so the next start tries again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db import transaction
from django.utils import timezone

if TYPE_CHECKING:
    from nocluster.plugin import Plugin


def install_once(plugin: Plugin) -> bool:
    """Run ``plugin.install()`` unless this cluster ran it already. Returns True when it ran here."""
    from nocluster.models import InstalledPlugin

    with transaction.atomic():
        record, _ = InstalledPlugin.objects.get_or_create(name=plugin.name)
        # Lock the row: a concurrent installer waits here until we commit.
        record = InstalledPlugin.objects.select_for_update().get(pk=record.pk)
        if record.installed_at is not None:
            return False
        plugin.install()
        record.installed_at = timezone.now()
        record.installed_by = plugin.app.instance_id
        record.save(update_fields=["installed_at", "installed_by"])
        plugin.logger.info("plugin %s installed by node %s", plugin.name, plugin.app.instance_id)
        return True
