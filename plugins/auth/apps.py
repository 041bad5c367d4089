from django.apps import AppConfig


class AuthConfig(AppConfig):
    name = "plugins.auth"
    label = "plugin_auth"
    default_auto_field = "django.db.models.BigAutoField"
    verbose_name = "Auth (token policy)"
    plugin_class = "plugins.auth.plugin.AuthPlugin"
