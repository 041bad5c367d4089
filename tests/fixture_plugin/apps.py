from django.apps import AppConfig


class FixturePluginConfig(AppConfig):
    name = "tests.fixture_plugin"
    label = "fixture_plugin"
    default_auto_field = "django.db.models.BigAutoField"
    plugin_class = "tests.fixture_plugin.plugin.FixturePlugin"
