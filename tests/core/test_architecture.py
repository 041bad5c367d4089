"""The shape of the code that the composition root relies on: components do not import each other at load time,
and only the entry points reach the process-wide ``app``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from tests.helpers import ROOT

COMPONENTS = ("cache", "locks", "outbox", "pubsub", "queue", "schedule", "sync")

# Imports every module of every component, each with no nocluster module loaded before it and the ``nocluster``
# package itself replaced by an empty one (its ``__init__`` re-exports the composition root, which imports
# everything), and prints which other component's modules each one loaded.
PROBE = """
import importlib, json, pathlib, sys, types
root = pathlib.Path(sys.argv[1])
components = sys.argv[2].split(",")
names = []
for component in components:
    for path in sorted((root / "nocluster" / component).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
found = {}
for name in names:
    for loaded in [n for n in sys.modules if n == "nocluster" or n.startswith("nocluster.")]:
        del sys.modules[loaded]
    package = types.ModuleType("nocluster")
    package.__path__ = [str(root / "nocluster")]
    sys.modules["nocluster"] = package
    importlib.import_module(name)
    own = name.split(".")[1]
    others = {n for n in sys.modules if n.startswith("nocluster.") and n.split(".")[1] in components}
    found[name] = sorted(n for n in others if n.split(".")[1] != own)
print(json.dumps(found))
"""


def test_no_component_module_imports_another_component_at_load_time() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT), ",".join(COMPONENTS)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"DJANGO_SETTINGS_MODULE": "settings", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert len(found) > 40  # every module of the seven components was imported
    assert {name: loaded for name, loaded in found.items() if loaded} == {}


# The composition root, the package's re-export, Django's and Celery's entry points (the /metrics view too), the
# admin and the management commands: nothing else may reach the process-wide application.
MAY_USE_THE_GLOBAL_APP = {
    "nocluster/__init__.py",
    "nocluster/app.py",
    "nocluster/apps.py",
    "nocluster/celery.py",
    "nocluster/metrics/views.py",
}
MAY_USE_THE_GLOBAL_APP_UNDER = ("nocluster/admin", "nocluster/management/")


def imports_the_global_app(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(alias.name == "nocluster.app" for alias in node.names):
            return True
        if not isinstance(node, ast.ImportFrom) or node.level != 0:
            continue
        if node.module == "nocluster.app" or (
            node.module == "nocluster" and any(alias.name == "app" for alias in node.names)
        ):
            return True
    return False


def test_only_entry_points_reach_the_global_app() -> None:
    offenders = []
    for path in sorted((ROOT / "nocluster").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative in MAY_USE_THE_GLOBAL_APP or relative.startswith(MAY_USE_THE_GLOBAL_APP_UNDER):
            continue
        if imports_the_global_app(ast.parse(path.read_text(), relative)):
            offenders.append(relative)
    assert offenders == []


def test_the_check_finds_an_import_of_the_global_app() -> None:
    assert imports_the_global_app(ast.parse("def f():\n    from nocluster import Plugin, app\n"))
    assert imports_the_global_app(ast.parse("from nocluster.app import Application\n"))
    assert not imports_the_global_app(ast.parse("from nocluster import Plugin\nfrom nocluster.apps import X\n"))
