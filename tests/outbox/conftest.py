"""Fixtures of the queue tests, for the outbox's tests with real workers."""

from tests.queue.conftest import worker_database_url

__all__ = ["worker_database_url"]
