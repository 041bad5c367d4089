from django.apps import AppConfig


class DataSourceMainConfig(AppConfig):
    name = "plugins.data_source_main"
    label = "data_source_main"
    default_auto_field = "django.db.models.BigAutoField"
