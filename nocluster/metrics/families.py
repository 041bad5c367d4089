"""Every metric nocluster records, defined once per process (``docs/metrics.md`` lists them).

The metrics are not registered in ``prometheus_client``'s global registry: in multiprocess mode each process
writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` and a scrape reads them all back
(:mod:`nocluster.metrics.exposition`). :func:`use_multiprocess_files` must run before :func:`families`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from prometheus_client import Counter, Histogram, values

# Seconds: from a fast message or lock wait up to long work.
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
LOCK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)


def use_multiprocess_files(directory: str) -> None:
    """Make every metric value of this process (and of the processes it forks) live in a file of ``directory``,
    where a scrape of any process of the node reads them (created if missing)."""
    os.makedirs(directory, exist_ok=True)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == directory and getattr(values.ValueClass, "_multiprocess", False):
        return
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()


@dataclass(frozen=True)
class Families:
    queue_published: Counter
    queue_run: Counter
    queue_retried: Counter
    queue_deferred: Counter
    queue_failed: Counter
    queue_run_seconds: Histogram
    pubsub_published: Counter
    pubsub_received: Counter
    pubsub_dropped_malformed: Counter
    sync_gaps: Counter
    sync_resyncs: Counter
    lock_acquisitions: Counter
    lock_wait_seconds: Histogram
    lock_hold_seconds: Histogram
    lock_force_releases: Counter


def _counter(name: str, documentation: str, *labels: str) -> Counter:
    # prometheus_client adds the _total suffix itself.
    return Counter(f"nocluster_{name}", documentation, labels, registry=None)


@functools.cache
def families() -> Families:
    """The metrics of this process, built on first use."""
    return Families(
        queue_published=_counter("queue_messages_published", "Event queue messages sent to the backend", "channel"),
        queue_run=_counter("queue_messages_run", "Tries of event queue messages run (process called)", "channel"),
        queue_retried=_counter("queue_messages_retried", "Event queue retries published after a failed try", "channel"),
        queue_deferred=_counter(
            "queue_messages_deferred", "Event queue messages put back for later without counting a try", "channel"
        ),
        queue_failed=_counter("queue_messages_failed", "Event queue messages recorded as failed", "channel"),
        queue_run_seconds=Histogram(
            "nocluster_queue_run_seconds",
            "Seconds one try of process took",
            ["channel"],
            buckets=RUN_BUCKETS,
            registry=None,
        ),
        pubsub_published=_counter("pubsub_messages_published", "Pub/sub messages published", "channel", "node"),
        pubsub_received=_counter(
            "pubsub_messages_received", "Pub/sub messages received and dispatched", "channel", "node"
        ),
        pubsub_dropped_malformed=_counter(
            "pubsub_messages_dropped_malformed", "Pub/sub envelopes dropped as malformed", "channel", "node"
        ),
        sync_gaps=_counter("sync_gaps", "Gaps in a sync channel's sequence numbers seen", "channel"),
        sync_resyncs=_counter("sync_resyncs", "Resyncs of sync subscribers started", "channel", "reason"),
        lock_acquisitions=_counter("lock_acquisitions", "Lock acquisitions, by result", "result"),
        lock_wait_seconds=Histogram(
            "nocluster_lock_wait_seconds", "Seconds waited to acquire a lock", buckets=LOCK_BUCKETS, registry=None
        ),
        lock_hold_seconds=Histogram(
            "nocluster_lock_hold_seconds",
            "Seconds a lock was held until released",
            buckets=LOCK_BUCKETS,
            registry=None,
        ),
        lock_force_releases=_counter("lock_force_releases", "Locks force-released by an operator"),
    )
