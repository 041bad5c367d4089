from django.db import models


class InstallRun(models.Model):
    """One row per run of FixturePlugin.install(), with the node that ran it."""

    instance_id = models.CharField(max_length=32)
    created_at = models.DateTimeField(auto_now_add=True)
