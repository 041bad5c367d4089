"""``ENGINE "nocluster.postgresql"``: outbox rows added outside a savepoint are inserted with the commit, in its
round trip (nocluster/postgresql/base.py), and still commit or roll back with the caller's data, on the real
PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import DataError, connection, transaction
from django.db.transaction import TransactionManagementError

from nocluster.identity import NodeIdentity
from nocluster.models import InstalledPlugin, OutboxMessage
from nocluster.outbox.manager import Outbox, OutboxSettings
from tests.conftest import server_unavailable, unique_name


class Recorder:
    """The sender of kind ``"t"``: what it was handed, as ``(id, body)``, and the rows of the table at that time."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, Any]] = []

    def __call__(self, row: OutboxMessage) -> None:
        self.sent.append((row.pk, row.body))

    @property
    def bodies(self) -> list[Any]:
        return [body for _, body in self.sent]


@pytest.fixture
def outbox(transactional_db: None) -> Iterator[tuple[Outbox, Recorder]]:
    # PostgreSQL, or a skip (a failure under CI); on PostgreSQL the test settings' engine must be ours: no skip.
    if connection.vendor != "postgresql":
        server_unavailable("PostgreSQL", str(connection.settings_dict["NAME"]))
    assert hasattr(connection, "insert_at_commit"), f"the tests' ENGINE is {connection.settings_dict['ENGINE']}"
    result, recorder = Outbox(NodeIdentity(unique_name("rt")), OutboxSettings()), Recorder()
    result.register("t", recorder)
    yield result, recorder
    OutboxMessage.objects.filter(app_name=result.identity.name).delete()


def add(outbox: Outbox, body: Any) -> None:
    outbox.add(None, "t", "work", f"m-{body}", body)


def rows_seen_by_another_connection(name: str, message_id: str | None = None) -> int:
    """The rows of app ``name`` (of ``message_id``, if given) committed, as a new connection sees them (not the
    caller's transaction). Sent rows leave in batches, except on a fresh outbox's first commits."""
    import psycopg

    params = {key: value for key, value in connection.get_connection_params().items() if key != "cursor_factory"}
    with psycopg.connect(**params) as other:
        [(count,)] = other.execute(
            f"SELECT count(*) FROM {OutboxMessage._meta.db_table} WHERE app_name = %s "
            "AND (%s::text IS NULL OR message_id = %s)",
            [name, message_id, message_id],
        ).fetchall()
        return int(count)


def test_rows_wait_for_the_commit_and_go_out_with_it_in_order(outbox: tuple[Outbox, Recorder]) -> None:
    box, recorder = outbox
    # Given a transaction with a write of the caller's and three rows
    with transaction.atomic():
        InstalledPlugin.objects.create(name=f"{box.identity.name}-data")
        for n in range(3):
            add(box, n)
        # Then, while it is open, no row is in the table, not even for the transaction itself
        assert OutboxMessage.objects.filter(app_name=box.identity.name).count() == 0
        assert connection._at_commit  # type: ignore[attr-defined]
    # And after the commit the rows were sent in order, each with the id the commit's INSERT gave it
    assert recorder.bodies == [0, 1, 2]
    ids = [pk for pk, _ in recorder.sent]
    assert all(isinstance(pk, int) for pk in ids) and ids == sorted(ids)
    assert InstalledPlugin.objects.filter(name=f"{box.identity.name}-data").exists()


def test_a_transaction_with_nothing_but_a_row_commits_it(outbox: tuple[Outbox, Recorder]) -> None:
    box, recorder = outbox
    # The INSERT is then the transaction's first statement: psycopg sends its BEGIN in the commit's pipeline
    with transaction.atomic():
        add(box, "alone")
    assert recorder.bodies == ["alone"]
    # And the connection goes on as usual after it
    with transaction.atomic():
        InstalledPlugin.objects.create(name=f"{box.identity.name}-after")
        add(box, "next")
    assert recorder.bodies == ["alone", "next"]


def test_a_rolled_back_transaction_inserts_nothing(outbox: tuple[Outbox, Recorder]) -> None:
    box, recorder = outbox
    with pytest.raises(RuntimeError), transaction.atomic():
        InstalledPlugin.objects.create(name=f"{box.identity.name}-data")
        add(box, "rolled back")
        raise RuntimeError("roll back")
    assert recorder.sent == [] and not connection._at_commit  # type: ignore[attr-defined]
    assert rows_seen_by_another_connection(box.identity.name) == 0
    # And the next transaction does not carry the row along
    with transaction.atomic():
        add(box, "committed")
    assert recorder.bodies == ["committed"]


def test_savepoints_keep_what_was_added_before_them(outbox: tuple[Outbox, Recorder]) -> None:
    box, recorder = outbox
    with transaction.atomic():
        add(box, "before")
        # A savepoint rolled back: the row added before it stays, the one added inside it goes
        with pytest.raises(RuntimeError), transaction.atomic():
            add(box, "inside, rolled back")
            raise RuntimeError("roll back the savepoint")
        # A savepoint released: its row stays
        with transaction.atomic():
            add(box, "inside, released")
        add(box, "after")
    assert recorder.bodies == ["before", "inside, released", "after"]


def test_a_row_the_database_refuses_fails_the_commit_naming_the_message(outbox: tuple[Outbox, Recorder]) -> None:
    box, recorder = outbox
    # Given a transaction whose row PostgreSQL refuses on the server (jsonb cannot hold the \u0000 of a NUL)
    with pytest.raises(DataError, match="unsupported Unicode escape sequence") as raised, transaction.atomic():
        InstalledPlugin.objects.create(name=f"{box.identity.name}-data")
        box.add(None, "t", "work", "m-nul", "a\x00b")
    # Then its commit raised, naming the message, and the caller's data rolled back with it
    assert "outbox row of t message m-nul on channel 'work'" in "".join(raised.value.__notes__)
    assert not InstalledPlugin.objects.filter(name=f"{box.identity.name}-data").exists()
    assert recorder.sent == [] and rows_seen_by_another_connection(box.identity.name) == 0
    # And the connection serves the next transaction
    with transaction.atomic():
        add(box, "next")
    assert recorder.bodies == ["next"]


def test_rows_keep_their_order_across_a_block_without_a_savepoint(outbox: tuple[Outbox, Recorder]) -> None:
    box, recorder = outbox
    # Given rows added before, inside and after a nested atomic(savepoint=False), where a row cannot wait (a failure
    # there rolls back the whole transaction, so nothing marks where it began)
    with transaction.atomic():
        add(box, "before")
        with transaction.atomic(savepoint=False):
            add(box, "inside")
        add(box, "after")
    # Then they are sent in the order they were added
    assert recorder.bodies == ["before", "inside", "after"]


def test_a_row_refused_before_a_savepoint_rolls_the_transaction_back(outbox: tuple[Outbox, Recorder]) -> None:
    box, recorder = outbox
    # Given a waiting row PostgreSQL refuses, inserted as a savepoint is made, and a caller that catches the error
    callbacks: list[str] = []
    with transaction.atomic():
        InstalledPlugin.objects.create(name=f"{box.identity.name}-data")
        transaction.on_commit(lambda: callbacks.append("ran"))
        box.add(None, "t", "work", "m-nul", "a\x00b")
        with pytest.raises(DataError), transaction.atomic():
            pass
    # Then the transaction rolled back (PostgreSQL would have answered its COMMIT with a silent ROLLBACK): no
    # commit callback ran, nothing was sent
    assert callbacks == [] and recorder.sent == []
    assert not InstalledPlugin.objects.filter(name=f"{box.identity.name}-data").exists()


def test_no_row_waits_in_a_transaction_whose_connection_closed(outbox: tuple[Outbox, Recorder]) -> None:
    box, recorder = outbox
    # Given a transaction whose connection closed, then a publish in it: refused, as a query would be
    with pytest.raises(TransactionManagementError), transaction.atomic():
        InstalledPlugin.objects.create(name=f"{box.identity.name}-data")
        connection.close()
        add(box, "lost")
    # Then the next transaction does not carry the row along
    with transaction.atomic():
        add(box, "next")
    assert recorder.bodies == ["next"]
    assert rows_seen_by_another_connection(box.identity.name, "m-lost") == 0


def as_django_s_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this connection behave as Django's own engine: every row inserted at once, no count of rollbacks."""
    from nocluster.postgresql.base import DatabaseWrapper

    monkeypatch.delattr(DatabaseWrapper, "insert_at_commit")
    monkeypatch.delattr(DatabaseWrapper, "_savepoint_rollback")
    monkeypatch.delattr(connection, "savepoint_rollbacks")


@pytest.mark.parametrize("engine", ["nocluster.postgresql", "django"])
@pytest.mark.parametrize("inserted", [False, True], ids=["waiting", "inserted"])
def test_a_row_rolled_back_with_a_manual_savepoint_is_not_sent(
    outbox: tuple[Outbox, Recorder], monkeypatch: pytest.MonkeyPatch, engine: str, inserted: bool
) -> None:
    if engine == "django":
        as_django_s_engine(monkeypatch)
    box, recorder = outbox
    # Given an outbox past its first commit (which always reads its rows back from the table)
    with transaction.atomic():
        add(box, "first")
    # When a row added after a transaction.savepoint() (still waiting for the commit, or inserted as an atomic()
    # savepoint was made) is rolled back with it, and the transaction commits
    with transaction.atomic():
        add(box, "kept")
        manual = transaction.savepoint()
        add(box, "rolled back")
        if inserted:
            with transaction.atomic():
                pass
        transaction.savepoint_rollback(manual)
    # Then only the row before the savepoint was sent
    assert recorder.bodies == ["first", "kept"]
