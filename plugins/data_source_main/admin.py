"""Admin for collections and fields; every change is announced so each node's registry follows."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from nocluster import app
from plugins.data_source_main.models import Collection, Field


def _plugin() -> Any:

    return app.plugins["data_source_main"]


class FieldInline(admin.TabularInline):
    model = Field
    extra = 0


@admin.register(Collection)
class CollectionAdmin(admin.ModelAdmin):
    list_display = ("name", "title", "updated_at")
    search_fields = ("name", "title")
    inlines = [FieldInline]

    def save_model(self, request: HttpRequest, obj: Collection, form: Any, change: bool) -> None:
        previous = Collection.objects.filter(pk=obj.pk).values_list("name", flat=True).first() if obj.pk else None
        super().save_model(request, obj, form, change)
        if previous and previous != obj.name:
            _plugin().changed(previous)  # renamed: the old name goes away on every node
        _plugin().changed(obj.name)

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        _plugin().changed(form.instance.name)

    def delete_model(self, request: HttpRequest, obj: Collection) -> None:
        name = obj.name
        super().delete_model(request, obj)
        _plugin().changed(name)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Collection]) -> None:
        names = list(queryset.values_list("name", flat=True))
        super().delete_queryset(request, queryset)
        for name in names:
            _plugin().changed(name)
