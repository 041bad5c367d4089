"""Reading the ``NOCLUSTER`` setting and building backends from it, the way Django builds ``CACHES``."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

DEFAULTS: dict[str, Any] = {
    "NAME": "main",
    "PUBSUB": {"BACKEND": "nocluster.pubsub.backends.local.LocalPubSubBackend", "OPTIONS": {}},
    "EVENT_QUEUE": {"BACKEND": "nocluster.queue.backends.database.DatabaseQueueBackend", "OPTIONS": {}},
    "LOCKS": {"BACKEND": "nocluster.locks.backends.local.LocalLockBackend", "OPTIONS": {}},
    "RATE_LIMITS": {"BACKEND": "nocluster.queue.rates.backends.local.LocalRateLimiter", "OPTIONS": {}},
    "SYNC": {"DEBOUNCE": 1.0},
    "METRICS": {"ENABLED": False},
}


def get_config() -> dict[str, Any]:
    """Return ``settings.NOCLUSTER`` merged over the defaults (one level deep)."""
    configured = getattr(settings, "NOCLUSTER", {})
    return {**DEFAULTS, **configured}


def load_backend(section: str, config: dict[str, Any] | None = None) -> Any:
    """Build the backend of ``NOCLUSTER[section]``: ``import_string(BACKEND)(**OPTIONS)``.

    Raises:
      ImproperlyConfigured: the section, its ``BACKEND`` or its ``OPTIONS`` are wrong; the message names the
        settings key.
    """
    entry = (config if config is not None else get_config()).get(section)
    key = f'NOCLUSTER["{section}"]'
    if not isinstance(entry, dict) or "BACKEND" not in entry:
        raise ImproperlyConfigured(f'{key} must be a dict with a "BACKEND" dotted path')
    try:
        backend_class = import_string(entry["BACKEND"])
    except ImportError as exc:
        raise ImproperlyConfigured(f'{key}["BACKEND"] = {entry["BACKEND"]!r} cannot be imported: {exc}') from exc
    options = entry.get("OPTIONS", {})
    try:
        return backend_class(**options)
    except TypeError as exc:
        raise ImproperlyConfigured(f'{key}["OPTIONS"] do not fit {entry["BACKEND"]}: {exc}') from exc
