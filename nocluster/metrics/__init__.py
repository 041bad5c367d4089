"""Prometheus metrics of a node (``NOCLUSTER["METRICS"]``, off by default; ``docs/metrics.md``).

:class:`Metrics` is what the composition root builds: one recorder per component, handed to its manager. Off,
every recorder is a no-op. On, ``prometheus_client`` runs in multiprocess mode: each process (gunicorn worker,
Celery pool process) writes its counts to files in ``MetricsSettings.directory`` and a scrape of ``/metrics``
(web nodes) or of the worker's exporter port sums them, with the gauges of :mod:`.collector` read at scrape time.
"""

from __future__ import annotations

from nocluster.identity import NodeIdentity
from nocluster.metrics.recorders import LockMetrics, PubSubMetrics, QueueMetrics, SyncMetrics
from nocluster.metrics.settings import MetricsSettings

__all__ = ["LockMetrics", "Metrics", "MetricsSettings", "PubSubMetrics", "QueueMetrics", "SyncMetrics"]


class Metrics:
    """The recorders of one node: ``queue``, ``pubsub``, ``sync``, ``locks`` (no-ops unless ``settings.enabled``)."""

    def __init__(self, settings: MetricsSettings, identity: NodeIdentity) -> None:
        self.settings = settings
        self.queue = QueueMetrics()
        self.pubsub = PubSubMetrics()
        self.sync = SyncMetrics()
        self.locks = LockMetrics()
        if settings.enabled:
            self._record(identity)

    def _record(self, identity: NodeIdentity) -> None:
        from nocluster.metrics import recorders
        from nocluster.metrics.families import families, use_multiprocess_files

        use_multiprocess_files(self.settings.directory)
        found = families()
        self.queue = recorders.PrometheusQueueMetrics(found)
        self.pubsub = recorders.PrometheusPubSubMetrics(found, identity)
        self.sync = recorders.PrometheusSyncMetrics(found)
        self.locks = recorders.PrometheusLockMetrics(found)

    def process_exited(self, pid: int) -> None:
        """A process of this node exited (a Celery pool process): drop its live-gauge files."""
        if self.settings.enabled:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.settings.directory)
