"""Task logs (ours): what a task's ``fn`` logs while it runs is kept with its :class:`~tasks.models.Task` row.

Kept: every record logged in the thread that runs ``fn`` while it runs (its plugin's loggers, the libraries it
calls) that passes the loggers' levels (the root's ``LOG_LEVEL``, INFO by default), and every
:meth:`TaskContext.log <tasks.api.TaskContext.log>` line whatever the levels. Records of threads ``fn`` starts
itself are not kept. One line per record, ``"HH:MM:SS.mmm LEVEL logger: message"`` (UTC), with its traceback.

Bounded: the row keeps the last :data:`MAX_LINES` lines and at most :data:`MAX_BYTES` bytes of them (UTF-8); a
line is cut at :data:`MAX_LINE_CHARS` characters; ``Task.log_dropped`` counts the older lines let go. The lines
of every try are kept (each try starts with a header naming its node).

Written in batches, never one query per line: the lines wait in memory until :data:`BATCH_LINES` are waiting,
or a line comes :data:`BATCH_SECONDS` after the last write, or the task reports progress, or the try ends; each
write is one transaction (``SELECT ... FOR UPDATE`` of the row, then one ``UPDATE``). So a line shows up in the
admin, on every node, within a second of the next line or progress report, and at the end of the try at the
latest. A node killed mid-try loses the lines it had not written yet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from django.db import transaction
from django.db.models import F

MAX_LINES = 200
MAX_BYTES = 64 * 1024
MAX_LINE_CHARS = 4000
BATCH_LINES = 50
BATCH_SECONDS = 1.0


def format_line(created: float, level: str, logger: str, message: str) -> str:
    """One log line: ``"HH:MM:SS.mmm LEVEL logger: message"``, UTC, cut at :data:`MAX_LINE_CHARS` characters."""
    stamp = datetime.fromtimestamp(created, UTC).strftime("%H:%M:%S.%f")[:-3]
    line = f"{stamp} {level} {logger}: {message}".replace("\r", "")
    return line if len(line) <= MAX_LINE_CHARS else line[: MAX_LINE_CHARS - 1] + "…"


def bounded(existing: list[str], new: list[str]) -> tuple[list[str], int]:
    """The last lines of ``existing + new`` that fit :data:`MAX_LINES` and :data:`MAX_BYTES`; and how many went."""
    lines = [*existing, *new][-MAX_LINES:]
    size = sum(len(line.encode()) + 1 for line in lines)
    start = 0
    while size > MAX_BYTES and start < len(lines):
        size -= len(lines[start].encode()) + 1
        start += 1
    kept = lines[start:]
    return kept, len(existing) + len(new) - len(kept)


class TaskLog:
    """The lines of one try of one task, waiting in memory for their batch to be written to the task's row."""

    def __init__(self, task_id: int) -> None:
        self.task_id = task_id
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._written_at = time.monotonic()
        self._writing = threading.local()

    def add(self, line: str) -> None:
        """Keep ``line`` (it may span several lines: a traceback); write the batch when it is due."""
        if getattr(self._writing, "active", False):
            return  # a record logged while this log writes its batch (by the database layer): not the task's
        with self._lock:
            self._lines.extend(line.splitlines() or [""])
            due = len(self._lines) >= BATCH_LINES or time.monotonic() - self._written_at >= BATCH_SECONDS
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the waiting lines to the task's row now (one transaction), if any wait."""
        with self._lock:
            lines, self._lines = self._lines, []
            self._written_at = time.monotonic()
        if not lines:
            return
        self._writing.active = True
        try:
            append_lines(self.task_id, lines)
        finally:
            self._writing.active = False


def append_lines(task_id: int, lines: list[str]) -> None:
    """Append ``lines`` to the log of task ``task_id``, keeping it within its bounds (one transaction)."""
    from tasks.models import Task

    with transaction.atomic():
        current = Task.objects.select_for_update().filter(pk=task_id).values_list("log", flat=True).first()
        if current is None:
            return  # the task was deleted
        kept, dropped = bounded(current.splitlines(), lines)
        Task.objects.filter(pk=task_id).update(log="\n".join(kept), log_dropped=F("log_dropped") + dropped)


# --- capturing the records of the thread that runs a task ----------------------------------------------------------
_active: dict[int, TaskLog] = {}
_active_lock = threading.Lock()


class _TaskThreadHandler(logging.Handler):
    """On the root logger: a record logged in a thread running a task goes to that task's log."""

    def handle(self, record: logging.LogRecord) -> bool:
        # Without the handler-wide lock of logging.Handler.handle: every record of the process comes here, and a
        # task writing its batch must not hold up the others' logging (each TaskLog has its own lock).
        if record.thread in _active:
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        log = _active.get(record.thread or 0)
        if log is None or getattr(record, "task_log_kept", False):
            return
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            log.add(format_line(record.created, record.levelname, record.name, message))
        except Exception:
            self.handleError(record)


_handler = _TaskThreadHandler()


@contextmanager
def capturing(log: TaskLog) -> Iterator[TaskLog]:
    """Keep what this thread logs in ``log`` until the block ends, then write what waits (also when it raises)."""
    root = logging.getLogger()
    if _handler not in root.handlers:  # added on first use: a Celery worker sets the root's handlers up at start
        root.addHandler(_handler)
    ident = threading.get_ident()
    with _active_lock:
        _active[ident] = log
    try:
        yield log
    finally:
        with _active_lock:
            _active.pop(ident, None)
        log.flush()
