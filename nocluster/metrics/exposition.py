"""One scrape: the multiprocess files of every process of this node, plus the cluster gauges, in the text format.

Shared by the web nodes' ``/metrics`` view (:mod:`.views`) and the Celery worker's exporter (:mod:`.exporter`),
so both answer the same way: 404 when metrics are off, 401 without the bearer token when one is set, 403 with
another one.
"""

from __future__ import annotations

import hmac
import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from nocluster.metrics.settings import MetricsSettings

CONTENT_TYPE = CONTENT_TYPE_LATEST


def refusal(settings: MetricsSettings, authorization: str) -> tuple[int, str] | None:
    """Why a scrape with the ``Authorization`` header ``authorization`` is refused, as ``(status, reason)``;
    None when it may be served."""
    if not settings.enabled:
        return 404, "metrics are off on this node (NOCLUSTER_METRICS)"
    if not settings.token:
        return None
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return 401, "a bearer token is required (Authorization: Bearer <NOCLUSTER_METRICS_TOKEN>)"
    if not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
        return 403, "wrong bearer token"
    return None


def scrape(settings: MetricsSettings, cluster: Collector | None) -> bytes:
    """The text exposition of this node: every process's counts (summed by labels) and ``cluster``'s gauges."""
    registry = CollectorRegistry()
    os.makedirs(settings.directory, exist_ok=True)
    MultiProcessCollector(registry, path=settings.directory)
    if cluster is not None:
        registry.register(cluster)
    return generate_latest(registry)
