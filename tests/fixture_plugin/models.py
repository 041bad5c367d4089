from django.db import models


class InstallRun(models.Model):
    """One row per run of FixturePlugin.install(), with the node that ran it."""

    instance_id = models.CharField(max_length=32)
    created_at = models.DateTimeField(auto_now_add=True)


class ScheduleTick(models.Model):
    """One call of the periodic job handler of tests/schedule/cluster_scenario.py: the run it was for, and where."""

    app_name = models.CharField(max_length=100)
    job = models.CharField(max_length=200)
    slot = models.DateTimeField(null=True)
    kind = models.CharField(max_length=10)
    message_id = models.CharField(max_length=64)
    instance_id = models.CharField(max_length=32)
    created_at = models.DateTimeField(auto_now_add=True)
