"""The Celery worker's exporter: ``/metrics`` of the worker's processes on ``NOCLUSTER["METRICS"]["PORT"]``.

The worker's main process serves it from one named thread (``nocluster-metrics-exporter``), started when the
worker is ready and stopped when it shuts down (``nocluster.celery``). It reads the multiprocess files every
pool process writes, so it shows the whole worker; it answers as the web nodes' view does (404, 401, 403).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.registry import Collector

from nocluster.metrics.exposition import CONTENT_TYPE, refusal, scrape
from nocluster.metrics.settings import MetricsSettings

logger = logging.getLogger("nocluster.metrics")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("exporter: " + format, *args)


def metrics_app(settings: MetricsSettings, cluster: Callable[[], Collector | None]) -> Callable[..., Iterable[bytes]]:
    """A WSGI app serving ``/metrics`` (and ``/``) of this node, ``cluster()`` giving the scrape-time gauges."""

    def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"only /metrics here\n"]
        refused = refusal(settings, environ.get("HTTP_AUTHORIZATION", ""))
        if refused is not None:
            status, reason = refused
            headers = [("Content-Type", "text/plain; charset=utf-8")]
            if status == 401:
                headers.append(("WWW-Authenticate", 'Bearer realm="metrics"'))
            start_response(f"{status} {_REASONS[status]}", headers)
            return [reason.encode() + b"\n"]
        body = scrape(settings, cluster())
        start_response("200 OK", [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))])
        return [body]

    return application


_REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}


class Exporter:
    """Serves :func:`metrics_app` on ``host:settings.port`` from a named thread; :meth:`stop` joins it."""

    def __init__(self, settings: MetricsSettings, cluster: Callable[[], Collector | None], host: str = "") -> None:
        if settings.port is None:
            raise ValueError('the exporter needs NOCLUSTER["METRICS"]["PORT"] (NOCLUSTER_METRICS_PORT)')
        self.settings = settings
        self.host = host
        self._cluster = cluster
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        port = self.settings.port
        assert port is not None
        self._server = make_server(self.host, port, metrics_app(self.settings, self._cluster),
                                   handler_class=_QuietHandler)  # fmt: skip
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="nocluster-metrics-exporter",
            daemon=True,  # losing it loses nothing: the counts are in the files
        )  # fmt: skip
        self._thread.start()
        logger.info("metrics exporter serves http://%s:%s/metrics", self.host or "0.0.0.0", port)

    def stop(self) -> None:
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        thread.join(5)
        if thread.is_alive():
            logger.warning("metrics exporter thread did not stop within 5 s")
