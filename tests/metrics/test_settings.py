"""``NOCLUSTER["METRICS"]``: off by default (``/metrics`` is a 404 and nothing is recorded), the bearer token, and
clear errors for wrong values."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import Client, override_settings

from nocluster import Application
from nocluster.metrics import Metrics, MetricsSettings, QueueMetrics
from nocluster.metrics.exporter import Exporter
from nocluster.metrics.families import families
from nocluster.metrics.recorders import PrometheusQueueMetrics
from tests.helpers import free_port
from tests.metrics.scrape import fetch


def metrics_setting(**values: Any) -> dict[str, Any]:
    return {**settings.NOCLUSTER, "METRICS": values}


def test_metrics_are_off_by_default_and_record_nothing() -> None:
    app = Application({"NAME": "off"})
    assert app.metrics.settings.enabled is False
    assert type(app.event_queue.metrics) is QueueMetrics  # the no-op recorder
    assert type(app.lock_manager.metrics).__name__ == "LockMetrics"


@pytest.mark.django_db
def test_metrics_page_is_a_404_while_off(client: Client) -> None:
    with override_settings(NOCLUSTER=metrics_setting(ENABLED=False)):
        response = client.get("/metrics")
    assert response.status_code == 404
    assert b"NOCLUSTER_METRICS" in response.content


@pytest.mark.django_db
def test_metrics_page_wants_the_bearer_token(client: Client, tmp_path: Path) -> None:
    # Given metrics on with a token
    with override_settings(NOCLUSTER=metrics_setting(ENABLED=True, TOKEN="s3cret", DIR=str(tmp_path))):
        # Then no token is a 401 that says how to authenticate, another token a 403, the token the page
        missing = client.get("/metrics")
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        right = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert missing.status_code == 401
    assert missing["WWW-Authenticate"].startswith("Bearer")
    assert wrong.status_code == 403
    assert right.status_code == 200
    assert right["Content-Type"].startswith("text/plain")
    assert b"nocluster_outbox_backlog 0.0" in right.content


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"ENABLED": "yes"}, "ENABLED"),
        ({"ENABLED": True, "PORT": "http"}, "PORT"),
        ({"ENABLED": True, "PORT": 70000}, "PORT"),
        ({"ENABLED": True, "TOKEN": 12}, "TOKEN"),
    ],
)
def test_wrong_values_name_their_key(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=rf'NOCLUSTER\["METRICS"\]\["{key}"\]'):
        MetricsSettings.from_config({"METRICS": values})


def test_the_settings_read_the_port_and_default_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    found = MetricsSettings.from_config({"METRICS": {"ENABLED": True, "PORT": "9808"}}, "my app")
    assert found.port == 9808
    assert found.directory == os.path.join(tempfile.gettempdir(), "nocluster-metrics-my_app")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/srv/metrics")
    assert MetricsSettings.from_config({"METRICS": {"ENABLED": True}}).directory == "/srv/metrics"


def test_recorders_are_the_prometheus_ones_when_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    # prometheus_client's multiprocess switch is process-wide: undone after this test, metrics made again.
    from prometheus_client import values

    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    request.addfinalizer(families.cache_clear)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    identity = Application({"NAME": "on"}).identity
    metrics = Metrics(MetricsSettings.from_config({"METRICS": {"ENABLED": True, "DIR": str(tmp_path)}}), identity)
    assert isinstance(metrics.queue, PrometheusQueueMetrics)
    assert getattr(values.ValueClass, "_multiprocess", False)


def test_the_exporter_serves_metrics_only_and_stops(tmp_path: Path) -> None:
    # Given an exporter without a token on a free port
    port = free_port()
    exporter = Exporter(MetricsSettings(True, "", port, str(tmp_path)), lambda: None)
    exporter.start()
    try:
        # Then /metrics is served (no token needed) and any other path is a 404
        status, body = fetch(f"http://127.0.0.1:{port}/metrics")
        assert status == 200, body
        assert fetch(f"http://127.0.0.1:{port}/admin/")[0] == 404
    finally:
        exporter.stop()
    # And once stopped, nothing listens there
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
