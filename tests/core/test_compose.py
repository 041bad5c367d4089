"""compose.yaml is checked here, since no container engine runs on this machine: its services, images, the
commands they run (which must exist in the project) and the environment variables (which settings must read)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml
from django.core.management import get_commands

from tests.helpers import ROOT

EXPECTED_SERVICES = {"postgres", "redis", "rabbitmq", "migrate", "web1", "web2", "worker1", "worker2"}


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


def settings_variables() -> set[str]:
    source = "\n".join(path.read_text() for path in (ROOT / "settings").glob("*.py"))
    return set(re.findall(r"env(?:_bool)?\(\s*\"([A-Z][A-Z0-9_]*)\"", source))


def test_the_cluster_has_its_services_and_each_an_image(services: dict[str, Any]) -> None:
    assert set(services) == EXPECTED_SERVICES
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"
    assert (ROOT / "Dockerfile").exists()


def test_servers_and_nodes_have_health_checks(services: dict[str, Any]) -> None:
    for name in EXPECTED_SERVICES - {"migrate"}:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_dependencies_name_existing_services(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    assert services["web1"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_every_command_exists_in_the_project(services: dict[str, Any]) -> None:
    commands = get_commands()
    for name, service in services.items():
        command = service.get("command")
        if not command or service.get("image", "").split(":")[0] in {"postgres", "redis", "rabbitmq"}:
            continue
        if command[:2] == ["python", "manage.py"]:
            assert command[2] in commands, f"{name}: manage.py {command[2]} is not a command"
        elif command[0] == "celery":
            # Imported as the worker would, with the service's environment (no connection is made)
            module = command[command.index("-A") + 1]
            env = {**os.environ, "DJANGO_SETTINGS_MODULE": "settings", **service.get("environment", {})}
            env.pop("DJANGO_ENV", None)
            check = f"import {module}, celery; assert isinstance({module}.app, celery.Celery)"
            done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"{name}: {module} has no Celery app: {done.stderr[-2000:]}"
        else:
            pytest.fail(f"{name}: unexpected command {command}")


def test_every_environment_variable_is_read_by_the_settings(services: dict[str, Any]) -> None:
    known = settings_variables()
    assert {"DATABASE_URL", "REDIS_URL", "BROKER_URL"} <= known
    for name, service in services.items():
        if service.get("image", "").split(":")[0] in {"postgres", "redis", "rabbitmq"}:
            continue
        unknown = set(service.get("environment", {})) - known
        assert not unknown, f"{name}: settings do not read {sorted(unknown)}"


def test_every_variable_the_settings_read_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = sorted(name for name in settings_variables() if f"`{name}`" not in readme)
    assert not missing, f"README does not document {missing}"


def test_the_settings_parser_finds_variables() -> None:
    # The regex above is what the two tests before rely on: it must see these.
    assert {"DJANGO_SECRET_KEY", "DJANGO_DEBUG", "NOCLUSTER_NAME"} <= settings_variables()
