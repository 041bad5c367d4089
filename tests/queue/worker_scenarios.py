"""Imported by the test Celery workers (``celery -A nocluster.celery worker -I tests.queue.worker_scenarios``)."""

from nocluster import app
from tests.queue.scenarios import register

register(app)
