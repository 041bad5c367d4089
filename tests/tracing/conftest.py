"""Fixtures of the queue tests, for the trace test with a real worker."""

from tests.queue.conftest import worker_database_url

__all__ = ["worker_database_url"]
