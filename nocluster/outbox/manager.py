"""``app.outbox``: what is published inside a transaction is written to a table in that transaction, and relayed
to its broker after the commit.

Ours (Django's ``transaction.on_commit`` alone loses the message when the broker is down at the commit, and a
failing callback skips every later one): ``add()`` inserts an :class:`~nocluster.models.OutboxMessage` row on the
caller's database alias, so the row and the caller's data commit or roll back together. Then:

- right after the commit, a robust ``on_commit`` callback sends the transaction's rows from memory (no query), in
  order; where a send would wait (the backend waits for the broker's confirm, rows handed off before are not sent
  yet, or older rows wait in the table) it hands them to the node's relay thread (``nocluster-outbox``) instead,
  which sends what commits handed it in commit order, consecutive rows of one queue channel in one batch. A fresh
  row is this process's to send: no other relay takes it. In a process whose relay thread is not running (a
  script that did not start the node) the committing thread always sends. The rows sent are deleted in batches
  within ``INTERVAL`` seconds, one statement per batch;
- a row that could not be sent waits with backoff (``attempts``, ``next_attempt``, ``last_error``), with the later
  rows of its channel; any node's relay thread sends them, in order, once due and the broker answers again;
- rows another node left behind (it died between its commit and its sends, or could not send) are taken over by
  every other node's relay once they are ``TAKEOVER`` seconds old, so the backlog drains whichever node is up.

A row is deleted only after its target accepted it (publisher confirms on RabbitMQ): delivery is at least once.
A node that dies between sending and deleting leaves rows that another node sends again; each send carries a new
``send_id``, and the receiving side drops a second copy. Relays claim rows with ``SELECT ... FOR UPDATE SKIP
LOCKED`` where the database has it (PostgreSQL); elsewhere (SQLite) one relay at a time per process, and SQLite's
write lock (``transaction_mode: IMMEDIATE`` in the settings) serialises processes.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from django.conf import settings as django_settings
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Count, Field, Min, Q, QuerySet
from django.utils import timezone

from nocluster.db import close_old_connections, execute_lean, relaxed_commit
from nocluster.durations import count, seconds
from nocluster.envelope import JSON
from nocluster.identity import NodeIdentity
from nocluster.lifecycle import Component

if TYPE_CHECKING:
    from nocluster.models import OutboxMessage

logger = logging.getLogger("nocluster.outbox")

Sender = Callable[["OutboxMessage"], None]
# Sends consecutive rows of one kind and channel at once; raises if any of them may not have been taken.
BatchSender = Callable[[Sequence["OutboxMessage"]], None]


def outbox_model() -> type[OutboxMessage]:
    """The model, imported on use: this module loads before Django's app registry is ready."""
    from nocluster.models import OutboxMessage

    return OutboxMessage


class _CommittedRows:
    """The ``on_commit`` callback of one transaction: the outbox rows it wrote, sent right after its commit."""

    def __init__(self, outbox: Outbox, alias: str) -> None:
        self.outbox = outbox
        self.alias = alias
        self.rows: list[OutboxMessage] = []
        # A row written inside a savepoint may have been rolled back with it: then the rows are read back from
        # the table (in order) instead of sent from memory. So too when a savepoint made after the first row (a
        # manual one, which ``savepoint_ids`` does not list) may have taken some: see savepoint_mark().
        self.in_savepoint = False
        self._savepoint_mark = savepoint_mark(alias)
        self.__qualname__ = "Outbox.send_committed"  # what Django names in a robust callback's error log

    def __call__(self) -> None:
        rolled_back = savepoint_mark(self.alias) != self._savepoint_mark
        # A row without an id was never inserted: it waited for the commit and a rollback to a savepoint took it.
        rows = [row for row in self.rows if row.pk is not None]
        self.outbox.send_committed(self.alias, rows, self.in_savepoint or rolled_back)


def savepoint_mark(alias: str) -> int:
    """A number of ``alias``'s connection that changes when a savepoint may have rolled back rows: its rollbacks to
    a savepoint on ENGINE "nocluster.postgresql", which counts them; elsewhere Django's count of the savepoints made
    (``savepoint_state``: any savepoint made since may have been rolled back)."""
    connection = connections[alias]
    rollbacks: int | None = getattr(connection, "savepoint_rollbacks", None)
    return connection.savepoint_state if rollbacks is None else rollbacks


@dataclass(frozen=True)
class OutboxSettings:
    """``NOCLUSTER["OUTBOX"]``: seconds, and rows per relay batch."""

    interval: float = 1.0
    backoff_max: float = 5.0
    takeover: float = 5.0
    batch: int = 100
    databases: tuple[str, ...] = (DEFAULT_DB_ALIAS,)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> OutboxSettings:
        values = config.get("OUTBOX", {})
        key = 'NOCLUSTER["OUTBOX"]'
        return cls(
            interval=seconds(values.get("INTERVAL", cls.interval), f'{key}["INTERVAL"]'),
            backoff_max=seconds(values.get("BACKOFF_MAX", cls.backoff_max), f'{key}["BACKOFF_MAX"]'),
            takeover=seconds(values.get("TAKEOVER", cls.takeover), f'{key}["TAKEOVER"]'),
            batch=count(values.get("BATCH", cls.batch), f'{key}["BATCH"]', least=1, most=10_000),
            databases=database_aliases(values.get("DATABASES", cls.databases), f'{key}["DATABASES"]'),
        )


def database_aliases(value: object, what: str) -> tuple[str, ...]:
    """The aliases of ``DATABASES`` whose outbox this node relays: a non-empty list of known aliases."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{what} must be a non-empty list of database aliases, got {value!r}")
    unknown = [alias for alias in value if alias not in django_settings.DATABASES]
    if unknown:
        raise ValueError(f"{what}: unknown database alias(es) {unknown!r} (known: {sorted(django_settings.DATABASES)})")
    return tuple(value)


# The columns add() writes; the others take their defaults from the model (set on the instance as well).
INSERTED_FIELDS = ("app_name", "kind", "channel", "message_id", "origin", "body", "created", "attempts", "last_error")


def insert_row(alias: str, row: OutboxMessage) -> None:
    """``INSERT`` ``row`` on ``alias`` and set its id: one statement built once per model and database, as the
    ORM's ``create()`` would send it, without the ORM's per-call compilation, run with
    :func:`~nocluster.db.execute_lean` (together, more than half of the outbox's cost per message). Values go
    through each field's own ``get_db_prep_save``, so JSON and datetimes are adapted as the ORM adapts them.

    On ``ENGINE "nocluster.postgresql"`` the statement goes to the connection, which sends it with the commit, in
    its round trip, or at once inside a savepoint (:mod:`nocluster.postgresql.base`); the id is set when it ran,
    before the commit's callbacks run."""
    connection = connections[alias]
    values = [field.get_db_prep_save(getattr(row, field.attname), connection) for field in inserted_fields()]
    insert_at_commit = getattr(connection, "insert_at_commit", None)  # ENGINE "nocluster.postgresql"
    if insert_at_commit is not None:
        what = f"the outbox row of {row.kind} message {row.message_id} on channel {row.channel!r}"
        insert_at_commit(insert_sql(alias), values, lambda pk: setattr(row, "pk", pk), what)
        return
    if connection.features.can_return_columns_from_insert:
        row.pk = execute_lean(alias, insert_sql(alias), values)[1][0]
        return
    with connection.cursor() as cursor:
        cursor.execute(insert_sql(alias), values)
        row.pk = cursor.lastrowid


@lru_cache(maxsize=1)
def inserted_fields() -> list[Field[Any, Any]]:
    by_name = {field.name: field for field in outbox_model()._meta.concrete_fields}
    return [by_name[name] for name in INSERTED_FIELDS]


@lru_cache(maxsize=8)
def insert_sql(alias: str) -> str:
    connection = connections[alias]
    quote = connection.ops.quote_name
    table = quote(outbox_model()._meta.db_table)
    columns = ", ".join(quote(field.column) for field in inserted_fields())
    placeholders = ", ".join(["%s"] * len(INSERTED_FIELDS))
    returning = f" RETURNING {quote('id')}" if connection.features.can_return_columns_from_insert else ""
    return f"INSERT INTO {table} ({columns}) VALUES ({placeholders}){returning}"  # noqa: S608


class Outbox(Component):
    """The outbox of one node.

    Parameters:
      identity: this node (its ``name`` scopes the rows; its instance id is the origin of what it adds).
      settings: relay cadence, backoff, takeover age and batch size.

    Components that publish through it register a sender per ``kind`` (:meth:`register`): the event queue
    (``"queue"``) and the sync messages (``"sync"``).
    """

    def __init__(self, identity: NodeIdentity, settings: OutboxSettings) -> None:
        self.identity = identity
        self.settings = settings
        self._senders: dict[str, Sender] = {}
        self._batch_senders: dict[str, BatchSender] = {}
        self._waits: dict[str, Callable[[], bool]] = {}
        self._databases: set[str] = set(settings.databases)
        self._reset()

    def _reset(self) -> None:
        self._flush_lock = threading.Lock()  # one relay at a time in this process (needed without SKIP LOCKED)
        self._sent_lock = threading.Lock()
        self._sent: dict[str, list[int]] = {}  # sent, not yet deleted, per database alias
        # True while older rows may be waiting, so a commit's rows cannot simply be sent first (order); a full
        # flush that leaves nothing behind clears it. True at start: this process has not looked yet.
        self._backlog = True
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Committed transactions' rows for the relay thread, in commit order; ``_unsent`` counts those handed off
        # and not yet sent (or put off), under ``_handoff_done``.
        self._handoff: deque[_CommittedRows] = deque()
        self._handoff_done = threading.Condition()
        self._unsent = 0

    def register(
        self, kind: str, send: Sender, send_many: BatchSender | None = None, waits: Callable[[], bool] | None = None
    ) -> None:
        """Relay rows of ``kind`` with ``send(row)``, which returns once the broker accepted the message.

        ``send_many(rows)``: consecutive rows of one channel go in one call (which raises if any of them may not
        have been taken: then all of them are sent again later, and the receiving side drops second copies).
        ``waits()``: True when a send waits for the broker's confirm; then a commit's rows of this kind always go
        to the relay thread (else the committing thread sends them itself when nothing is ahead of them).
        """
        self._senders[kind] = send
        if send_many is not None:
            self._batch_senders[kind] = send_many
        if waits is not None:
            self._waits[kind] = waits

    # --- inside the caller's transaction ------------------------------------------------------------------
    def add(self, using: str | None, kind: str, channel: str, message_id: str, body: JSON, memo: Any = None) -> None:
        """Write a row in the current transaction of database ``using``; it is sent after that commit. ``memo``:
        what ``body`` was made from, kept on the row in memory for its sender (``row.memo``) in this process.

        Raises whatever the database raises (the caller's transaction is then broken, as with any write). On
        ``ENGINE "nocluster.postgresql"``, outside a savepoint, the row is inserted with the commit instead (one
        round trip for both): the transaction does not see it before, and a row the database refuses makes the
        commit raise, with a note naming the message.
        """
        alias = using or DEFAULT_DB_ALIAS
        row = outbox_model()(
            app_name=self.identity.name,
            kind=kind,
            channel=channel,
            message_id=message_id,
            origin=self.identity.instance_id,
            body=body,
            created=timezone.now(),
        )
        row.memo = memo
        insert_row(alias, row)
        self._databases.add(alias)
        committed = self._committed_rows(alias)
        committed.rows.append(row)
        committed.in_savepoint |= bool(connections[alias].savepoint_ids)

    def _committed_rows(self, alias: str) -> _CommittedRows:
        # One callback per transaction, not one per message: the one registered for this transaction holds its
        # rows (found again among the callbacks, unless a rolled-back savepoint dropped it: then anew).
        for entry in connections[alias].run_on_commit:
            callback = entry[1]
            if isinstance(callback, _CommittedRows) and callback.outbox is self:
                return callback
        rows = _CommittedRows(self, alias)
        transaction.on_commit(rows, using=alias, robust=True)
        return rows

    # --- relaying -------------------------------------------------------------------------------------------
    def send_committed(self, alias: str, rows: list[OutboxMessage], in_savepoint: bool = False) -> None:
        """Right after a commit: send the rows it wrote, or hand them to the relay thread (when it runs) if a send
        would wait: for the broker's confirm, behind rows handed off before, or behind older rows that wait in the
        table (a broker that failed). So a commit never waits for a broker that is down, nor for a confirm; a
        quick send (Redis) costs less here than a thread switch."""
        thread = self._thread
        if thread is not None and thread.is_alive() and not self._stopping.is_set() and self._would_wait(rows):
            committed = _CommittedRows(self, alias)
            committed.rows, committed.in_savepoint = rows, in_savepoint
            with self._handoff_done:
                self._handoff.append(committed)
                self._unsent += len(rows)
            self._wake.set()
            return
        self._send_committed(alias, rows, in_savepoint or connections[alias].in_atomic_block)

    def _would_wait(self, rows: list[OutboxMessage]) -> bool:
        if self._backlog or self._unsent:
            return True
        return any(self._waits[kind]() for kind in {row.kind for row in rows} if kind in self._waits)

    def _send_committed(self, alias: str, rows: list[OutboxMessage], in_savepoint: bool) -> None:
        """Send a commit's rows from memory, in order. While older rows may be waiting (a failure, or a process
        that has not looked yet), or when some were written in a savepoint (which may have rolled back), send what
        the table holds, in order, instead (:meth:`flush`)."""
        if self._backlog or in_savepoint:
            self.flush(alias, include=[row.pk for row in rows])
            return
        with self._flush_lock:
            sent = self._send_in_order(alias, rows, set())
        # Fresh rows: no other relay takes them, so their deletion can wait and be batched.
        with self._sent_lock:
            self._sent.setdefault(alias, []).extend(sent)
        if len(self._sent[alias]) >= self.settings.batch:
            self.delete_sent(alias)

    def _send_handed_off(self) -> None:
        """In the relay thread: send what commits handed off, in commit order, a database's consecutive commits
        together (so a channel's rows go in batches)."""
        while True:
            with self._handoff_done:
                if not self._handoff:
                    return
                alias = self._handoff[0].alias
                taken: list[_CommittedRows] = []
                while self._handoff and self._handoff[0].alias == alias and len(taken) < self.settings.batch:
                    taken.append(self._handoff.popleft())
            rows = [row for committed in taken for row in committed.rows]
            try:
                self._send_committed(alias, rows, any(committed.in_savepoint for committed in taken))
            except Exception:
                # The rows are in the table: this relay's flush sends them, in order, once they are due.
                self._backlog = True
                raise
            finally:
                with self._handoff_done:
                    self._unsent -= len(rows)
                    self._handoff_done.notify_all()

    def wait_handed_off(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until the relay thread has sent (or put off) every row handed to it;
        True if it has. For ``drain()`` and tests: a commit returns before its rows are sent."""
        with self._handoff_done:
            return self._handoff_done.wait_for(lambda: self._unsent == 0, timeout)

    def flush(self, using: str = DEFAULT_DB_ALIAS, include: list[int] | None = None) -> int:
        """Send the due rows of this app on ``using``, oldest first, until none is left; return how many were
        sent. Due: rows whose backoff passed, rows ``TAKEOVER`` seconds old (their node did not send them), and
        the rows ``include`` (just committed by the caller). A fresh row is its committing thread's to send.
        A row that fails waits with backoff and holds back the later rows of its channel (order per channel)."""
        total = 0
        with self._flush_lock:
            while True:
                sent, taken, failed = self._flush_batch(using, include or [])
                total += sent
                if taken < self.settings.batch or failed:
                    break
        self.delete_sent(using)
        return total

    def _flush_batch(self, alias: str, include: list[int]) -> tuple[int, int, bool]:
        now = timezone.now()
        rows = outbox_model().objects.using(alias).filter(app_name=self.identity.name)
        # A row waiting out its backoff holds back the later rows of its channel, not those of other channels.
        blocked = set(rows.filter(next_attempt__gt=now).values_list("kind", "channel"))
        held_back = Q()
        for kind, channel in blocked:
            held_back |= Q(kind=kind, channel=channel)
        stale = now - timedelta(seconds=self.settings.takeover)
        due = rows.filter(Q(next_attempt__lte=now) | Q(created__lt=stale) | Q(pk__in=include)).exclude(held_back)
        with transaction.atomic(using=alias):
            # Deleted in the claiming transaction: once it commits, no other relay can take these rows again.
            relaxed_commit(alias)  # losing this commit in a crash only sends the rows once more
            with self._sent_lock:
                pending = list(self._sent.get(alias, ()))
            taken = list(self._claim(due.exclude(pk__in=pending)))
            sent = self._send_in_order(alias, taken, blocked)
            if sent:
                rows.filter(pk__in=sent).delete()
        self._backlog = bool(blocked) or len(sent) < len(taken)
        return len(sent), len(taken), len(sent) < len(taken)

    def _claim(self, rows: QuerySet[OutboxMessage]) -> QuerySet[OutboxMessage]:
        return rows.select_for_update(skip_locked=True).order_by("id")[: self.settings.batch]

    def _send_in_order(self, alias: str, rows: list[OutboxMessage], blocked: set[tuple[str, str]]) -> list[int]:
        """Send ``rows`` in order, skipping channels in ``blocked`` (a failure adds its channel); return the ids
        of the rows sent. Consecutive rows of one channel go in one call where their kind has a batch sender."""
        sent: list[int] = []
        index = 0
        while index < len(rows):
            start, row = index, rows[index]
            key = (row.kind, row.channel)
            run = self._run_from(rows, start)
            index += len(run)
            if key in blocked:
                continue
            try:
                self._send(run)
            except Exception as exc:
                # These rows and the later ones of their channel wait out the backoff, in order.
                later = [r.pk for r in rows[start + 1 :] if (r.kind, r.channel) == key]
                self._postpone(alias, row, exc, later)
                blocked.add(key)
                self._backlog = True
                self._wake.set()
                continue
            sent.extend(r.pk for r in run)
        return sent

    def _run_from(self, rows: list[OutboxMessage], start: int) -> list[OutboxMessage]:
        """``rows[start]`` and the rows right after it of the same kind and channel, if that kind is sent in
        batches; else ``rows[start]`` alone."""
        first = rows[start]
        if first.kind not in self._batch_senders:
            return [first]
        end = start + 1
        while end < len(rows) and (rows[end].kind, rows[end].channel) == (first.kind, first.channel):
            end += 1
        return rows[start:end]

    def delete_sent(self, alias: str = DEFAULT_DB_ALIAS) -> None:
        """Delete the rows this process sent (one statement per batch). If this fails, they are kept and tried
        again; if the process dies first, other nodes send them again after ``TAKEOVER`` seconds."""
        with self._sent_lock:
            sent, self._sent[alias] = self._sent.get(alias, []), []
        try:
            for start in range(0, len(sent), self.settings.batch):
                with transaction.atomic(using=alias):
                    relaxed_commit(alias)  # losing this commit in a crash only sends the rows once more
                    chunk = sent[start : start + self.settings.batch]
                    outbox_model().objects.using(alias).filter(pk__in=chunk).delete()
        except Exception:
            with self._sent_lock:
                self._sent[alias] = sent + self._sent[alias]
            raise

    def _send(self, rows: list[OutboxMessage]) -> None:
        kind = rows[0].kind
        if len(rows) > 1:
            self._batch_senders[kind](rows)
            return
        send = self._senders.get(kind)
        if send is None:
            raise LookupError(f"no sender for outbox rows of kind {kind!r} on this node")
        send(rows[0])

    def _postpone(self, alias: str, row: OutboxMessage, exc: Exception, later: list[int]) -> None:
        delay = min(self.settings.backoff_max, 0.5 * 2 ** min(row.attempts, 16))
        error = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "outbox: %s message %s on %r not relayed (attempt %d), next try in %.1f s: %s",
            row.kind, row.message_id, row.channel, row.attempts + 1, delay, error,
            extra={"channel": row.channel, "message_id": row.message_id},
        )  # fmt: skip
        row.attempts += 1
        next_attempt = timezone.now() + timedelta(seconds=delay)
        rows = outbox_model().objects.using(alias)
        rows.filter(pk=row.pk).update(attempts=row.attempts, next_attempt=next_attempt, last_error=error[:2000])
        if later:
            rows.filter(pk__in=later, next_attempt__isnull=True).update(next_attempt=next_attempt)

    # --- inspection -----------------------------------------------------------------------------------------
    def backlog(self) -> dict[str, Any]:
        """Rows waiting on every known database: ``{"pending": n, "oldest_seconds": s or None}``."""
        pending, oldest = 0, None
        now = timezone.now()
        for alias in sorted(self._databases):
            stats = (
                outbox_model()
                .objects.using(alias)
                .filter(app_name=self.identity.name)
                .aggregate(n=Count("id"), first=Min("created"))
            )
            pending += stats["n"]
            if stats["first"] is not None:
                age = (now - stats["first"]).total_seconds()
                oldest = age if oldest is None else max(oldest, age)
        return {"pending": pending, "oldest_seconds": oldest}

    # --- the relay thread -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="nocluster-outbox", daemon=True)
        self._thread.start()
        atexit.register(self.stop)  # a process that ends without stopping its node still sends what it committed

    def stop(self) -> None:
        """Stop the relay thread once it has sent what commits handed it (rows it could not send wait in the
        table for the next relay)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        atexit.unregister(self.stop)
        self._stopping.set()
        self._wake.set()
        thread.join(30)
        if thread.is_alive():
            logger.error("outbox relay thread did not stop within 30 s")
            return
        try:
            self._send_handed_off()  # a commit that handed off as the thread was finishing
        except Exception:
            logger.warning("outbox: rows committed at stop not sent; they wait in the table for the next relay")

    def close(self) -> None:
        """Delete what this process sent (a node stopping leaves no row for others to send again)."""
        for alias in sorted(self._databases):
            try:
                self.delete_sent(alias)
            except Exception:
                logger.warning("outbox: sent rows on %r not deleted at stop; other nodes send them again", alias)

    def after_fork(self) -> None:
        # The parent's sent and handed-off rows are the parent's to send and delete.
        self._reset()

    def _run(self) -> None:
        failing = False
        next_flush = 0.0
        while True:
            stopping = self._stopping.is_set()
            self._wake.clear()  # before looking: a commit handing off after this wakes the next wait
            try:
                self._send_handed_off()
                if time.monotonic() >= next_flush or stopping:
                    for alias in sorted(self._databases):
                        self.flush(alias)
                    next_flush = time.monotonic() + self.settings.interval
                if failing:
                    logger.warning("outbox relay works again")
                failing = False
            except Exception as exc:
                # The whole traceback once; while the database stays unreachable, one line per attempt.
                if not failing:
                    logger.exception("outbox relay failed; retrying every %s s", self.settings.interval)
                else:
                    logger.warning("outbox relay still failing: %s: %s", type(exc).__name__, str(exc).splitlines()[0])
                failing = True
                next_flush = time.monotonic() + self.settings.interval
            finally:
                close_old_connections()
            if stopping:
                return
            self._wake.wait(max(next_flush - time.monotonic(), 0.0))
