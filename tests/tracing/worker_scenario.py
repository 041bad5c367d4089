"""Imported by the trace test's Celery worker (``celery ... worker -I tests.tracing.worker_scenario``): the SDK of
``tests.tracing.otel`` and the ``traced`` channel (``tests.tracing.channels``)."""

from nocluster import app
from tests.tracing import channels, otel  # noqa: F401 (otel sets up the SDK)

channels.register(app)
