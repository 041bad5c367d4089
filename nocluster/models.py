"""Cluster-wide records of the core."""

from __future__ import annotations

from django.db import models


class InstalledPlugin(models.Model):
    """A plugin whose ``install()`` ran in this cluster (the row is also the install lock)."""

    name = models.CharField(max_length=100, unique=True)
    installed_at = models.DateTimeField(null=True, blank=True)
    installed_by = models.CharField(max_length=32, blank=True, help_text="instance id of the installing node")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name
