"""``NOCLUSTER["METRICS"]``: whether this node records and serves Prometheus metrics, and how."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured

KEY = 'NOCLUSTER["METRICS"]'
DEFAULTS: dict[str, Any] = {"ENABLED": False, "TOKEN": "", "PORT": None, "DIR": ""}


@dataclass(frozen=True)
class MetricsSettings:
    """What ``NOCLUSTER["METRICS"]`` says.

    Attributes:
      enabled: record metrics and serve ``/metrics`` (off: nothing is recorded and ``/metrics`` is a 404).
      token: when set, a scrape must send ``Authorization: Bearer <token>`` (401 without one, 403 with another).
      port: the Celery worker's exporter port (its main process serves ``/metrics`` there); None: no exporter.
      directory: ``prometheus_client``'s multiprocess folder, shared by every process of one machine's node
        (gunicorn workers, Celery pool processes), so their counts add up.
    """

    enabled: bool
    token: str
    port: int | None
    directory: str

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "main") -> MetricsSettings:
        """Read ``config["METRICS"]`` (a ``NOCLUSTER``-shaped dict); ``name`` (``app.name``) names the default
        folder. Raises ``ImproperlyConfigured`` naming the key of a wrong value."""
        values = {**DEFAULTS, **(config.get("METRICS") or {})}
        return cls(
            enabled=_flag(values["ENABLED"]),
            token=_token(values["TOKEN"]),
            port=_port(values["PORT"]),
            directory=str(values["DIR"] or default_directory(name)),
        )


def default_directory(name: str) -> str:
    """``PROMETHEUS_MULTIPROC_DIR`` if set, else ``<tmp>/nocluster-metrics-<app.name>``."""
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return configured or os.path.join(tempfile.gettempdir(), f"nocluster-metrics-{safe}")


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ImproperlyConfigured(f'{KEY}["ENABLED"] must be a bool, got {value!r}')
    return value


def _token(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ImproperlyConfigured(f'{KEY}["TOKEN"] must be a str, got {type(value).__name__}')
    return value.strip()


def _port(value: object) -> int | None:
    if value in (None, "", 0):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise ImproperlyConfigured(f'{KEY}["PORT"] must be a TCP port number, got {value!r}')
    port = int(value)
    if not 0 < port < 65536:
        raise ImproperlyConfigured(f'{KEY}["PORT"] must be between 1 and 65535, got {port}')
    return port
