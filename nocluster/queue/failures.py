"""Failed messages: recorded in the database (``nocluster.models.FailedMessage``), never dropped.

``message_failed`` (a Django signal) is sent after a record is written, with ``message`` (the
:class:`~nocluster.queue.message.Message`), ``error`` and ``node``, so that e.g. the tasks app can mark its
task failed. Re-queueing a record is :meth:`nocluster.queue.manager.EventQueue.requeue`.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from django.db import DataError, transaction
from django.dispatch import Signal

from nocluster.queue.message import Message

if TYPE_CHECKING:
    from nocluster.models import FailedMessage

logger = logging.getLogger("nocluster.queue")

message_failed = Signal()


def failed_message_model() -> type[FailedMessage]:
    """The model, imported on use: this module loads before Django's app registry is ready."""
    from nocluster.models import FailedMessage

    return FailedMessage


def record(app_name: str, message: Message, error: str, node: str) -> None:
    """Write the failed record of ``message``; if even that fails, log the whole message at ERROR and raise.

    A payload the database refuses as given (a NUL character in a string, which PostgreSQL cannot store) is
    stored escaped, as JSON text under ``"nocluster.unstorable_payload"``, with the reason in the error.
    """
    fields: dict[str, Any] = {
        "app_name": app_name,
        "channel": message.channel,
        "message_id": message.id,
        "payload": message.payload,
        "error": _storable(error)[:20000],
        "tries": message.retried + 1,
        "max_retries": message.max_retries,
        "timeout": message.timeout,
        "node": node[:200],
    }
    try:
        try:
            _create(fields)
        except (DataError, ValueError) as refused:
            # ASCII JSON text: a NUL or a lone surrogate becomes a \\u escape, which the database stores.
            fields["payload"] = {"nocluster.unstorable_payload": json.dumps(message.payload, ensure_ascii=True)}
            reason = f"\n(payload stored escaped: the database refused it as given: {type(refused).__name__})"
            fields["error"] = (fields["error"] + _storable(reason))[:20000]
            _create(fields)
    except Exception as exc:
        # One line (the caller decides what happens next and logs it): the whole message, so it is never lost.
        logger.error(
            "could not record failed message %s of %s.%s (%s: %s); message: %s",
            message.id, app_name, message.channel, type(exc).__name__, str(exc).splitlines()[0][:200],
            json.dumps(message.to_wire(), ensure_ascii=True),
            extra={"channel": message.channel, "message_id": message.id},
        )  # fmt: skip
        raise
    message_failed.send(sender=Message, message=message, error=error, node=node)


def _create(fields: dict[str, Any]) -> None:
    # In a savepoint: a refused row must not break the transaction the caller may be in.
    with transaction.atomic():
        failed_message_model().objects.create(**fields)


def _storable(text: str) -> str:
    return text.replace("\x00", "\\x00")
