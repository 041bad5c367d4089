"""The plugin lifecycle: phases in INSTALLED_APPS order, errors naming the plugin, install once per cluster."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from nocluster import Application, Plugin, PluginError
from nocluster.plugin import plugin_class_of
from tests.fixture_plugin.plugin import PAUSE_ENV
from tests.helpers import start_nodes, stop_nodes


def recording_plugin(calls: list[tuple[str, str]], fail_in: str | None = None) -> type[Plugin]:
    class Recording(Plugin):
        def _record(self, hook: str) -> None:
            calls.append((self.name, hook))
            if hook == fail_in:
                raise RuntimeError(f"boom in {hook}")

        def before_load(self) -> None:
            self._record("before_load")

        def load(self) -> None:
            self._record("load")

        def after_start(self) -> None:
            self._record("after_start")

        def before_stop(self) -> None:
            self._record("before_stop")

    return Recording


def app_config(label: str, plugin_class: Any) -> Any:
    return SimpleNamespace(label=label, plugin_class=plugin_class)


def test_each_phase_runs_for_every_plugin_before_the_next_phase() -> None:
    # Given two plugins, "first" listed before "second"
    calls: list[tuple[str, str]] = []
    app = Application({"NAME": "lifecycle"})
    configs = [app_config("first", recording_plugin(calls)), app_config("second", recording_plugin(calls))]

    # When the plugins load, start and stop
    app.plugins.populate(configs)
    app.plugins.after_start()
    app.plugins.before_stop()

    # Then every phase ran for both plugins, in order, before the next phase; stop runs in reverse order
    assert calls == [
        ("first", "before_load"),
        ("second", "before_load"),
        ("first", "load"),
        ("second", "load"),
        ("first", "after_start"),
        ("second", "after_start"),
        ("second", "before_stop"),
        ("first", "before_stop"),
    ]
    assert app.plugins.names() == ["first", "second"]
    assert app.plugins["second"].name == "second"


def test_populate_is_idempotent() -> None:
    calls: list[tuple[str, str]] = []
    app = Application({"NAME": "lifecycle"})
    configs = [app_config("only", recording_plugin(calls))]

    app.plugins.populate(configs)
    app.plugins.populate(configs)

    assert calls == [("only", "before_load"), ("only", "load")]


@pytest.mark.parametrize("hook", ["before_load", "load", "after_start"])
def test_a_failing_hook_names_its_plugin(hook: str) -> None:
    # Given a healthy plugin and one that raises in `hook`
    calls: list[tuple[str, str]] = []
    app = Application({"NAME": "lifecycle"})
    configs = [app_config("healthy", recording_plugin(calls)), app_config("broken", recording_plugin(calls, hook))]

    # When the lifecycle runs
    with pytest.raises(PluginError) as excinfo:
        app.plugins.populate(configs)
        app.plugins.after_start()

    # Then the error names the plugin and the hook, and keeps the cause
    assert excinfo.value.plugin == "broken"
    assert excinfo.value.hook == hook
    assert "'broken'" in str(excinfo.value) and hook in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, RuntimeError)


def test_a_plugin_failing_to_load_leaves_no_half_loaded_registry() -> None:
    calls: list[tuple[str, str]] = []
    app = Application({"NAME": "lifecycle"})
    configs = [app_config("healthy", recording_plugin(calls)), app_config("broken", recording_plugin(calls, "load"))]

    with pytest.raises(PluginError):
        app.plugins.populate(configs)

    assert not app.plugins.loaded
    assert len(app.plugins) == 0


def test_plugin_class_must_be_a_plugin_subclass() -> None:
    with pytest.raises(TypeError, match=r"'weird'.*not a nocluster\.Plugin subclass"):
        plugin_class_of(app_config("weird", dict))
    assert (
        plugin_class_of(app_config("by_path", "tests.fixture_plugin.plugin.FixturePlugin")).__name__ == "FixturePlugin"
    )
    assert plugin_class_of(SimpleNamespace(label="plain")) is None


def test_installed_apps_plugins_are_loaded_in_order() -> None:
    from django.apps import apps

    from nocluster import app

    labels = [config.label for config in apps.get_app_configs()]
    names = app.plugins.names()
    assert "fixture_plugin" in names
    assert names == sorted(names, key=lambda name: labels.index(name) if name in labels else len(labels))
    assert app.plugins["fixture_plugin"].logger.name == "nocluster.plugins.fixture_plugin"


@pytest.mark.cluster
def test_install_runs_once_when_two_nodes_start_together(node_env: dict[str, str]) -> None:
    from nocluster.models import InstalledPlugin
    from tests.fixture_plugin.models import InstallRun

    # Given a cluster where the fixture plugin was never installed
    InstalledPlugin.objects.all().delete()
    InstallRun.objects.all().delete()

    # When two node processes start at the same time (each installs plugins on start, and waits half a second
    # after its InstallRun row, so that a second install would overlap the first)
    nodes = start_nodes(2, {**node_env, PAUSE_ENV: "0.5"}, start=False)
    try:
        # Then install() ran exactly once, on one of the two nodes, and is recorded as installed by it
        runs = list(InstallRun.objects.all())
        assert len(runs) == 1
        assert runs[0].instance_id in {node.instance_id for node in nodes}
        record = InstalledPlugin.objects.get(name="fixture_plugin")
        assert record.installed_at is not None and record.installed_by == runs[0].instance_id
    finally:
        stop_nodes(nodes)


@pytest.mark.django_db
def test_install_is_skipped_when_already_installed() -> None:
    from nocluster import app
    from nocluster.install import install_once
    from nocluster.models import InstalledPlugin
    from tests.fixture_plugin.models import InstallRun

    InstalledPlugin.objects.filter(name="fixture_plugin").delete()
    before = InstallRun.objects.count()

    assert install_once(app.plugins["fixture_plugin"]) is True
    assert install_once(app.plugins["fixture_plugin"]) is False
    assert InstallRun.objects.count() == before + 1


@pytest.mark.django_db
def test_a_failing_install_is_retried_on_the_next_start() -> None:
    from nocluster.install import install_once
    from nocluster.models import InstalledPlugin

    class Flaky(Plugin):
        attempts = 0

        def install(self) -> None:
            type(self).attempts += 1
            if self.attempts == 1:
                raise RuntimeError("database not ready")

    plugin = Flaky(Application({"NAME": "lifecycle"}), app_config("flaky", Flaky))
    with pytest.raises(RuntimeError):
        install_once(plugin)
    assert not InstalledPlugin.objects.filter(name="flaky").exists()
    assert install_once(plugin) is True
    assert InstalledPlugin.objects.get(name="flaky").installed_at is not None
