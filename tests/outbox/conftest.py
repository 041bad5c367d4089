"""Fixtures of the queue tests, for the outbox's broker tests."""

from tests.queue.conftest import worker_database_url

__all__ = ["worker_database_url"]
