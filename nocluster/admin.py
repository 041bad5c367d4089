from django.contrib import admin

from nocluster.models import InstalledPlugin


@admin.register(InstalledPlugin)
class InstalledPluginAdmin(admin.ModelAdmin):
    list_display = ("name", "installed_at", "installed_by")
    readonly_fields = ("name", "installed_at", "installed_by")

    def has_add_permission(self, request: object) -> bool:
        return False
