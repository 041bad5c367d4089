"""Collections (tables of the main data source) and their fields: the source of truth of the schema registry."""

from __future__ import annotations

from typing import Any

from django.db import models


class Collection(models.Model):
    name = models.CharField(max_length=100, unique=True)
    title = models.CharField(max_length=200, blank=True, default="")
    options = models.JSONField(default=dict, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def to_schema(self) -> dict[str, Any]:
        """This collection as the registry holds it (JSON)."""
        return {
            "title": self.title,
            "options": self.options,
            "fields": {field.name: field.to_schema() for field in self.fields.all()},
        }


class Field(models.Model):
    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="fields")
    name = models.CharField(max_length=100)
    type = models.CharField(max_length=50)
    options = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["collection_id", "name"]
        constraints = [models.UniqueConstraint(fields=["collection", "name"], name="data_source_main_field_unique")]

    def __str__(self) -> str:
        return f"{self.collection.name}.{self.name}"

    def to_schema(self) -> dict[str, Any]:
        return {"type": self.type, "options": self.options}
