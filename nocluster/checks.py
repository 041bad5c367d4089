"""System checks on the ``NOCLUSTER`` setting: a wrong backend path fails ``manage.py check`` with its key."""

from __future__ import annotations

from typing import Any

from django.core.checks import Error, register
from django.utils.module_loading import import_string

from nocluster.conf import get_config

SECTIONS = ("PUBSUB", "EVENT_QUEUE", "LOCKS")


@register()
def check_nocluster_settings(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    config = get_config()
    errors: list[Error] = []
    name = config.get("NAME")
    if not isinstance(name, str) or not name or any(c in name for c in " :."):
        errors.append(
            Error(
                f'NOCLUSTER["NAME"] = {name!r} must be a non-empty str without spaces, ":" or "."', id="nocluster.E001"
            )
        )
    for section in SECTIONS:
        entry = config.get(section)
        if not isinstance(entry, dict) or "BACKEND" not in entry:
            errors.append(Error(f'NOCLUSTER["{section}"] must be a dict with a "BACKEND"', id="nocluster.E002"))
            continue
        try:
            import_string(entry["BACKEND"])
        except ImportError as exc:
            errors.append(Error(f'NOCLUSTER["{section}"]["BACKEND"] cannot be imported: {exc}', id="nocluster.E003"))
    return errors
