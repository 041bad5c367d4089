"""Node-process commands for the auth plugin tests (``tests.plugins.auth_scenario:handle``)."""

from __future__ import annotations

from typing import Any

from tests.node import default_handler


def handle(command: dict[str, Any]) -> Any:
    from nocluster import app
    from plugins.auth.models import TokenPolicy

    if command["cmd"] == "policy":
        return app.plugins["plugin_auth"].token_policy()
    if command["cmd"] == "set_token_expiration":
        policy = TokenPolicy.objects.get(name="default")
        policy.token_expiration = command["seconds"]
        policy.save()
        return None
    return default_handler(command)
