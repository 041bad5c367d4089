"""Failed messages: recorded in the database (``nocluster.models.FailedMessage``), never dropped; re-queued on demand.

``message_failed`` (a Django signal) is sent after a record is written, with ``message`` (the
:class:`~nocluster.queue.message.Message`), ``error`` and ``node``, so that e.g. the tasks app can mark its
task failed.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from django.dispatch import Signal

from nocluster.queue.message import Message

if TYPE_CHECKING:
    from nocluster.models import FailedMessage
    from nocluster.queue.manager import EventQueue

logger = logging.getLogger("nocluster.queue")

message_failed = Signal()


def record(queue: EventQueue, message: Message, error: str, node: str) -> None:
    """Write the failed record of ``message``; if even that fails, log the whole message at ERROR and raise."""
    from nocluster.models import FailedMessage

    try:
        FailedMessage.objects.create(
            app_name=queue.app.name,
            channel=message.channel,
            message_id=message.id,
            payload=message.payload,
            error=error[:20000],
            tries=message.retried + 1,
            max_retries=message.max_retries,
            timeout=message.timeout,
            node=node[:200],
        )
    except Exception:
        logger.exception(
            "could not record failed message %s of %s; message: %s",
            message.id, queue.full_channel(message.channel), json.dumps(message.to_json()),
        )  # fmt: skip
        raise
    message_failed.send(sender=type(queue), message=message, error=error, node=node)


def requeue(queue: EventQueue, failed: FailedMessage) -> str:
    """Publish ``failed`` again as a new message (same channel, payload, timeout, max_retries); delete the record.

    The publish comes first: if it raises, the record stays. Returns the new message id.
    """
    message_id = queue.publish(failed.channel, failed.payload, timeout=failed.timeout, max_retries=failed.max_retries)
    failed.delete()
    logger.info("failed message %s of %s re-queued as %s", failed.message_id, failed.channel, message_id)
    return message_id
