from __future__ import annotations

from django.apps import AppConfig
from django.db.models.signals import post_migrate


class NoclusterConfig(AppConfig):
    """Loads the plugins (before_load, load) once every app is ready, and installs them after ``migrate``.

    Loading only registers (subscriptions, queue consumers, caches); no connection or thread is opened here.
    Consumers start in ``app.start()`` (``runnode``, ``runserver``, Celery worker processes).
    """

    name = "nocluster"
    verbose_name = "nocluster"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from nocluster import checks  # noqa: F401  (registers the system checks)
        from nocluster.app import app

        app.load_plugins()
        post_migrate.connect(install_plugins_after_migrate, sender=self, dispatch_uid="nocluster-install")


def install_plugins_after_migrate(sender: AppConfig, using: str = "default", **kwargs: object) -> None:
    from nocluster.app import app

    app.install_plugins()
