"""``NOCLUSTER["SCHEDULE"]``: where the scheduler runs and how it tells a late slot from a missed one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings as django_settings
from django.db import DEFAULT_DB_ALIAS

from nocluster.durations import seconds

KEY = 'NOCLUSTER["SCHEDULE"]'


@dataclass(frozen=True)
class ScheduleSettings:
    """Seconds, except ``enabled``, ``roles`` and ``database``.

    Attributes:
      enabled: whether this process's scheduler claims slots at all (``NOCLUSTER_SCHEDULER``).
      roles: the node roles whose processes claim slots: ``"web"`` (runnode, runserver) and ``"node"`` (runnode
        --no-http, test nodes) by default, not ``"worker"`` (each Celery pool process is a node: they would all poll).
        Every process still records the outcome of the job messages it runs.
      grace: how late a slot may still be claimed as on time; a slot older than that which no node claimed is
        missed (the job's misfire policy decides). Must exceed the clock skew between nodes plus their pauses.
      tick: the longest the scheduler thread sleeps (it wakes at each job's next slot, and at least this often).
      keep: how long run rows are kept (the latest of each job is always kept).
      database: the database alias holding the scheduler's rows (the queue's outbox row commits on it too).
    """

    enabled: bool = True
    roles: tuple[str, ...] = ("web", "node")
    grace: float = 5.0
    tick: float = 1.0
    keep: float = 7 * 86400.0
    database: str = DEFAULT_DB_ALIAS

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ScheduleSettings:
        values = config.get("SCHEDULE", {})
        if not isinstance(values, dict):
            raise ValueError(f"{KEY} must be a dict, got {type(values).__name__}")
        unknown = sorted(set(values) - {"ENABLED", "ROLES", "GRACE", "TICK", "KEEP", "DATABASE"})
        if unknown:
            raise ValueError(f"{KEY}: unknown key(s) {unknown}")
        roles = values.get("ROLES", cls.roles)
        if isinstance(roles, str) or not all(isinstance(role, str) for role in roles):
            raise ValueError(f'{KEY}["ROLES"] must be a list of role names, got {roles!r}')
        database = values.get("DATABASE", cls.database)
        if database not in django_settings.DATABASES:
            raise ValueError(f'{KEY}["DATABASE"]: unknown database alias {database!r}')
        result = cls(
            enabled=bool(values.get("ENABLED", cls.enabled)),
            roles=tuple(roles),
            grace=seconds(values.get("GRACE", cls.grace), f'{KEY}["GRACE"]', most=3600.0),
            tick=seconds(values.get("TICK", cls.tick), f'{KEY}["TICK"]', most=60.0),
            keep=seconds(values.get("KEEP", cls.keep), f'{KEY}["KEEP"]'),
            database=database,
        )
        if result.keep < max(3600.0, 10 * result.grace):
            # A pruned claim must never be claimable again: only slots within the grace are.
            raise ValueError(f'{KEY}["KEEP"] must be at least 3600 s and 10 x GRACE, got {result.keep}')
        return result
