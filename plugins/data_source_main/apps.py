from __future__ import annotations

from django.apps import AppConfig


class DataSourceMainConfig(AppConfig):
    """The main data source: collections and fields in the database, a schema registry in memory on every node."""

    name = "plugins.data_source_main"
    label = "data_source_main"
    verbose_name = "Main data source"
    default_auto_field = "django.db.models.BigAutoField"
    plugin_class = "plugins.data_source_main.plugin.DataSourceMainPlugin"
