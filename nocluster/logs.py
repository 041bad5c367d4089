"""Structured logs: every record carries this node's instance id, and, where they apply, the channel, message
id, lock key and task id, so one fault can be followed across nodes.

Set ``NOCLUSTER_LOG_FORMAT=json`` for one JSON object per line. nocluster's own code passes the context as
``extra``: ``logger.warning("...", extra={"channel": ..., "message_id": ...})``; plugins may do the same.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from nocluster.identity import NodeIdentity

CONTEXT_FIELDS = ("instance_id", "app_name", "channel", "message_id", "lock_key", "task_id", "plugin")


_identity: NodeIdentity | None = None


def bind_identity(identity: NodeIdentity) -> None:
    """Name this process's node in every record from now on (the composition root calls it once)."""
    global _identity
    _identity = identity


class NodeContextFilter(logging.Filter):
    """Adds ``instance_id`` and ``app_name`` of this process's node to every record (empty until it is bound)."""

    def filter(self, record: logging.LogRecord) -> bool:
        identity = _identity
        if not hasattr(record, "instance_id"):
            record.instance_id = identity.instance_id if identity is not None else ""
        if not hasattr(record, "app_name"):
            record.app_name = identity.name if identity is not None else ""
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, pid, the context fields that are set, and the
    exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value not in (None, ""):
                entry[field] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The text format, with ``key=value`` context appended when set."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(process)d %(instance_short)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.instance_short = str(getattr(record, "instance_id", ""))[:8]
        text = super().format(record)
        context = " ".join(
            f"{field}={getattr(record, field)}"
            for field in CONTEXT_FIELDS[2:]
            if getattr(record, field, None) not in (None, "")
        )
        return f"{text} {context}" if context else text
