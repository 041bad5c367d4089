from django.apps import AppConfig


class AsyncTaskManagerConfig(AppConfig):
    name = "plugins.async_task_manager"
    label = "async_task_manager"
    default_auto_field = "django.db.models.BigAutoField"
    verbose_name = "Async task manager (long jobs with progress)"
    plugin_class = "plugins.async_task_manager.plugin.AsyncTaskManagerPlugin"
