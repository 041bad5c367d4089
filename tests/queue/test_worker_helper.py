"""The test helper that runs real Celery workers leaves none behind when one does not become ready."""

from __future__ import annotations

import pytest

from tests.conftest import unique_name
from tests.queue.conftest import cluster_env, delete_keys
from tests.queue.workers import Worker


@pytest.mark.cluster
def test_a_worker_that_is_not_ready_in_time_is_killed_and_its_stacks_reported(
    worker_database_url: str, redis_url: str
) -> None:
    name = unique_name("ready")
    worker = Worker(f"late-{name}", cluster_env(name, redis_url, worker_database_url, redis_url), concurrency=1)
    try:
        with pytest.raises(AssertionError, match="waiting for worker late-") as failure:
            worker.wait_ready(timeout=0.05)  # too soon for any worker
        assert not worker.alive
    finally:
        worker.kill()
        delete_keys(name)
    assert "its log ends" in str(failure.value)
