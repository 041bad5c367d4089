"""Dropping a second copy of a relayed message (ours): the outbox delivers at least once.

A relay killed between sending a row and deleting it sends the row again. Messages that went through the outbox
carry ``relayed``; when one has run to its end (done, cancelled or failed for good), its id is written to
:class:`~nocluster.models.ProcessedMessage`, and a copy that arrives later is dropped before it runs. Two copies
that run at the same time are not caught (the window is a relay's crash, then its restart within one run).
Entries older than ``window`` seconds are removed as new ones are written.
"""

from __future__ import annotations

import itertools
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from django.db import IntegrityError, transaction
from django.utils import timezone

from nocluster.queue.message import Message

if TYPE_CHECKING:
    from nocluster.models import ProcessedMessage

logger = logging.getLogger("nocluster.queue")

# Seconds a processed relayed message is remembered; every PURGE_EVERY writes the older entries are removed.
WINDOW = 24 * 3600.0
PURGE_EVERY = 500


def processed_model() -> type[ProcessedMessage]:
    from nocluster.models import ProcessedMessage  # this module loads before the app registry is ready

    return ProcessedMessage


class DedupeLedger:
    """The relayed messages of app ``app_name`` that already ran (database-wide, so every worker sees them)."""

    def __init__(self, app_name: str, window: float = WINDOW) -> None:
        self.app_name = app_name
        self.window = window
        self._writes = itertools.count(1)

    def ran_already(self, message: Message) -> bool:
        """True if ``message`` is a second copy of a relayed message that ran to its end."""
        if not message.relayed or message.retried:
            return False
        return processed_model().objects.filter(app_name=self.app_name, message_id=message.id).exists()

    def remember(self, message: Message) -> None:
        """Record that the relayed ``message`` ran to its end (nothing for other messages)."""
        if not message.relayed:
            return
        model = processed_model()
        try:
            with transaction.atomic():
                model.objects.create(app_name=self.app_name, message_id=message.id)
        except IntegrityError:
            return  # recorded by the other copy
        if next(self._writes) % PURGE_EVERY == 0:
            model.objects.filter(created__lt=timezone.now() - timedelta(seconds=self.window)).delete()
