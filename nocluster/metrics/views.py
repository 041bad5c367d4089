"""``/metrics`` on a web node (mounted in ``nocluster.urls``)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from nocluster.metrics.exposition import CONTENT_TYPE, refusal, scrape


def metrics_view(request: HttpRequest) -> HttpResponse:
    """The node's metrics; 404 while off, 401/403 without the right bearer token (``NOCLUSTER["METRICS"]``)."""
    from nocluster import app

    settings = app.metrics_settings()
    refused = refusal(settings, request.headers.get("Authorization", ""))
    if refused is not None:
        status, reason = refused
        response = HttpResponse(reason + "\n", status=status, content_type="text/plain; charset=utf-8")
        if status == 401:
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(scrape(settings, app.metrics_collector()), content_type=CONTENT_TYPE)
