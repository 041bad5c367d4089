"""How a plugin declares a periodic job: :class:`PeriodicJob`, checked when it is made.

A plugin lists its jobs in a class attribute, ``schedules = [PeriodicJob(...)]``, or adds them in ``load()`` with
``self.app.scheduler.add(PeriodicJob(...))``. Each slot of a job becomes one event queue message on ``channel``,
for the whole cluster; the channel must be subscribed (in ``load()``) on every node, as any queue channel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

from nocluster.durations import count, seconds
from nocluster.envelope import JSON, ensure_json, validate_channel
from nocluster.schedule.slots import SHORTEST_INTERVAL, CronSchedule, IntervalSchedule, Schedule, time_zone

# What a job does about slots that passed while no node could run them (all nodes down, or the job's nodes
# stalled longer than the grace): "skip" runs none of them, "once" runs one catch-up for all of them.
MISFIRE_POLICIES = ("skip", "once")
# The key a periodic job's message payload carries, beside the declared payload's own keys (see :func:`run_info`).
MARKER = "nocluster.schedule"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}$")


@dataclass(frozen=True)
class PeriodicJob:
    """A job that runs once per slot for the whole cluster.

    Parameters:
      name: unique in the project (prefix it with the plugin's name); letters, digits and ``_ . : -``.
      channel: the event queue channel its messages go to (without the app prefix).
      every: seconds between slots (at least 1), aligned on the Unix epoch: ``every=3600`` runs on the hour (UTC).
      cron: instead of ``every``, a cron expression: 5 fields, or 6 with seconds first (``"*/10 * * * * *"``).
      timezone: the IANA time zone a ``cron`` expression is read in (default ``"UTC"``).
      payload: a JSON object; each message carries it with one more key, ``"nocluster.schedule"`` (see
        :func:`run_info`), naming the job, the slot and the kind of run.
      misfire: ``"skip"`` (default) or ``"once"``: what happens to slots no node claimed within the grace
        (``NOCLUSTER["SCHEDULE"]["GRACE"]``), e.g. while every node was down: skipped, or one catch-up run for all.
      enabled: whether the job runs when it is first seen; afterwards the database row decides (admin, command).
      timeout, max_retries: of each message, as for :meth:`EventQueue.publish`.

    Raises:
      ValueError, TypeError: a bad value; the message names the job.
    """

    name: str
    channel: str
    every: float | None = None
    cron: str | None = None
    timezone: str = "UTC"
    payload: dict[str, Any] = field(default_factory=dict)
    misfire: str = "skip"
    enabled: bool = True
    timeout: float = 15.0
    max_retries: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name) or self.name.endswith("."):
            raise ValueError(
                f"periodic job name {self.name!r}: use letters, digits and _ . : - (at most 200 characters)"
            )
        what = f"periodic job {self.name!r}"
        try:
            validate_channel(self.channel)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        if (self.every is None) == (self.cron is None):
            raise ValueError(f"{what}: give either every (seconds) or cron (an expression), not both nor neither")
        if self.every is not None:
            seconds(self.every, f"{what}: every", most=366 * 86400.0)
            if self.every < SHORTEST_INTERVAL:
                raise ValueError(f"{what}: every must be at least {SHORTEST_INTERVAL:g} s, got {self.every!r}")
        if self.cron is not None and not isinstance(self.cron, str):
            raise TypeError(f"{what}: cron must be a str, got {type(self.cron).__name__}")
        time_zone(self.timezone, what)
        if self.misfire not in MISFIRE_POLICIES:
            raise ValueError(f"{what}: misfire must be one of {MISFIRE_POLICIES}, got {self.misfire!r}")
        if not isinstance(self.payload, dict):
            raise TypeError(f"{what}: payload must be a JSON object (dict), got {type(self.payload).__name__}")
        ensure_json(self.name, self.payload, "periodic job")
        if MARKER in self.payload:
            raise ValueError(f"{what}: the payload key {MARKER!r} is reserved (the scheduler sets it)")
        if not isinstance(self.enabled, bool):
            raise TypeError(f"{what}: enabled must be a bool, got {self.enabled!r}")
        seconds(self.timeout, f"{what}: timeout")
        count(self.max_retries, f"{what}: max_retries", most=1000)
        self.schedule  # noqa: B018 (parses the cron expression now, so a bad one fails at declaration)

    @cached_property
    def schedule(self) -> Schedule:
        """The job's slots (:mod:`nocluster.schedule.slots`)."""
        if self.every is not None:
            return IntervalSchedule(self.every)
        assert self.cron is not None
        try:
            return CronSchedule(self.cron, self.timezone)
        except ValueError as exc:
            raise ValueError(f"periodic job {self.name!r}: {exc}") from None

    def message_payload(self, slot: datetime | None, kind: str, missed: int = 0) -> dict[str, JSON]:
        """The payload of the message of one run: the declared payload and the run's description."""
        info: dict[str, JSON] = {
            "job": self.name,
            "slot": slot.isoformat() if slot is not None else None,
            "kind": kind,
            "missed": missed,
        }
        return {**self.payload, MARKER: info}


def run_info(payload: object) -> dict[str, Any] | None:
    """What a periodic job's message says about its run, or None for any other message.

    Returns ``{"job": name, "slot": ISO-8601 UTC time or None, "kind": "scheduled" | "catch-up" | "manual",
    "missed": n}``: ``slot`` is the nominal time of the slot (None for a run started by hand), ``missed`` the
    number of slots a catch-up run stands for (itself included).
    """
    if isinstance(payload, dict):
        info = payload.get(MARKER)
        if isinstance(info, dict) and isinstance(info.get("job"), str):
            return info
    return None
