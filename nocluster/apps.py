from __future__ import annotations

from django.apps import AppConfig
from django.core.checks import register
from django.core.exceptions import ImproperlyConfigured
from django.db.models.signals import post_migrate

from nocluster import app, checks, tracing


class NoclusterConfig(AppConfig):
    """Django's hook into the composition root: loads the plugins (before_load, load) once every app is ready,
    registers the system checks, and installs the plugins after ``migrate``.

    Loading only registers (subscriptions, queue consumers, caches); no connection or thread is opened here.
    Consumers start in ``app.start()`` (``runnode``, ``runserver``, Celery worker processes).
    """

    name = "nocluster"
    verbose_name = "nocluster"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        register(checks.check_nocluster_settings)
        register(checks.durability_check(app.event_queue), deploy=True)
        register(checks.rate_limit_check(app.event_queue), deploy=True)
        register(checks.check_secret_key, deploy=True)
        tracing.configure(tracing_setting(app.config))
        app.load_plugins()
        post_migrate.connect(install_plugins_after_migrate, sender=self, dispatch_uid="nocluster-install")


def tracing_setting(config: dict[str, object]) -> bool:
    """``NOCLUSTER["TRACING"]``: carry trace context and make spans when OpenTelemetry is installed (default)."""
    value = config.get("TRACING", True)
    if not isinstance(value, bool):
        raise ImproperlyConfigured(f'NOCLUSTER["TRACING"] must be True or False (NOCLUSTER_TRACING), got {value!r}')
    return value


def install_plugins_after_migrate(sender: AppConfig, using: str = "default", **kwargs: object) -> None:
    app.install_plugins()
