"""When a periodic job is due: its slots, the nominal times (UTC) at which it runs.

A slot is a point in time every node computes alike from the job's declaration alone, without asking another node
or reading its own clock for anything but "now": so two nodes, or one node before and after a restart, name the
same run with the same slot, and the database can keep one row per slot (see :mod:`nocluster.schedule.claims`).

- :class:`IntervalSchedule`: every ``every`` seconds, aligned on the Unix epoch (``every=3600`` runs on the hour,
  UTC), counted in whole microseconds so that no float rounding lets two nodes disagree.
- :class:`CronSchedule`: a cron expression parsed by `cronsim <https://pypi.org/project/cronsim/>`_ (5 fields, or 6
  with seconds first), evaluated in the job's time zone (DST handled as Debian's cron does); its slots are still
  stored as UTC instants.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:
    from collections.abc import Iterator

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MICROSECOND = timedelta(microseconds=1)
# The shortest interval: a slot costs a few database writes, and the tick loop is not a real-time clock.
SHORTEST_INTERVAL = 1.0


class Schedule(ABC):
    """The slots of one job. Every method takes and returns aware datetimes; results are in UTC."""

    @abstractmethod
    def next_after(self, moment: datetime) -> datetime | None:
        """The first slot strictly after ``moment`` (None: there is none)."""

    @abstractmethod
    def latest_at_or_before(self, moment: datetime) -> datetime | None:
        """The last slot at or before ``moment`` (None: there is none)."""

    @abstractmethod
    def describe(self) -> str:
        """The schedule as the admin and ``manage.py schedule list`` show it."""

    def previous(self, slot: datetime) -> datetime | None:
        """The slot before ``slot``."""
        return self.latest_at_or_before(slot - ONE_MICROSECOND)

    def between(self, after: datetime, before: datetime, most: int) -> Iterator[datetime]:
        """The slots strictly between ``after`` and ``before``, oldest first, at most ``most`` of them."""
        slot = self.next_after(after)
        for _ in range(most):
            if slot is None or slot >= before:
                return
            yield slot
            slot = self.next_after(slot)


class IntervalSchedule(Schedule):
    """Every ``every`` seconds (at least :data:`SHORTEST_INTERVAL`), on multiples of it since the Unix epoch."""

    def __init__(self, every: float) -> None:
        self.step = round(every * 1_000_000)  # microseconds

    def _index(self, moment: datetime) -> int:
        # Integer arithmetic on microseconds: floor((moment - epoch) / step), exact on every node.
        return (moment - EPOCH) // timedelta(microseconds=self.step)

    def _slot(self, index: int) -> datetime:
        return EPOCH + timedelta(microseconds=self.step * index)

    def next_after(self, moment: datetime) -> datetime:
        return self._slot(self._index(moment) + 1)

    def latest_at_or_before(self, moment: datetime) -> datetime:
        return self._slot(self._index(moment))

    def between(self, after: datetime, before: datetime, most: int) -> Iterator[datetime]:
        first, last = self._index(after) + 1, self._index(before - ONE_MICROSECOND)
        for index in range(first, min(last, first + most - 1) + 1):
            yield self._slot(index)

    def describe(self) -> str:
        every = self.step / 1_000_000
        return f"every {every:g} s"


class CronSchedule(Schedule):
    """A cron expression (cronsim: 5 fields, or 6 with seconds first) in time zone ``zone`` (an IANA name)."""

    def __init__(self, expression: str, zone: str = "UTC") -> None:
        from cronsim import CronSim, CronSimError  # only periodic jobs need it

        self._cronsim = CronSim
        self.expression = expression
        self.zone = ZoneInfo(zone)
        self.zone_name = zone
        try:
            CronSim(expression, datetime.now(self.zone))
        except CronSimError as exc:
            raise ValueError(f"cron expression {expression!r}: {exc}") from None

    def _first(self, start: datetime, reverse: bool) -> datetime | None:
        try:
            found = next(self._cronsim(self.expression, start.astimezone(self.zone), reverse=reverse))
        except StopIteration:
            return None
        return found.astimezone(UTC)

    def next_after(self, moment: datetime) -> datetime | None:
        # cronsim drops the microseconds, then steps one second forward: the result is after ``moment``.
        return self._first(moment, reverse=False)

    def latest_at_or_before(self, moment: datetime) -> datetime | None:
        # Reverse from one microsecond later: cronsim then starts at the whole second at or before ``moment``.
        return self._first(moment + ONE_MICROSECOND, reverse=True)

    def describe(self) -> str:
        return f"cron {self.expression}" + ("" if self.zone_name == "UTC" else f" ({self.zone_name})")


def time_zone(name: object, what: str) -> str:
    """``name`` if it is an IANA time zone name this machine knows, else ``ValueError`` naming ``what``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: timezone must be an IANA name such as 'UTC' or 'Europe/Paris', got {name!r}")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{what}: unknown timezone {name!r}") from None
    return name
