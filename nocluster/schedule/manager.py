"""``app.scheduler``: periodic jobs, one run per slot for the whole cluster (SPEC.md, "Event queue").

Every node runs the scheduler (a thread ``nocluster-scheduler`` in the processes whose role is in
``NOCLUSTER["SCHEDULE"]["ROLES"]``). At each slot of each job, every node tries to claim it in the database; one
succeeds and publishes the job's message in the same transaction (:mod:`nocluster.schedule.claims`), the others
find the slot taken. Slots are the schedule's nominal times (:mod:`nocluster.schedule.slots`), so the nodes agree
on them whatever their clocks say; the state lives in the database, so it survives restarts.

When slots are due, at ``now`` by this node's clock, for a job whose latest handled slot is ``last``:

- every slot after ``last`` and at most ``GRACE`` seconds old is on time: claimed, oldest first. A node that
  paused briefly, or whose clock is behind, still claims what nobody claimed;
- older slots after ``last`` were missed (every node was down, or stalled for longer than the grace). Misfire
  ``"skip"``: none of them runs. ``"once"``: one catch-up run stands for all of them, claimed as the first missed
  slot, which every node derives from ``last`` alone, so two nodes waking at different times claim the same one.

Clock skew: never a duplicate, at any skew (a slot has one row). A node whose clock is ahead by d claims slots up
to d early, one behind up to d late. Skew plus pauses above ``GRACE`` can make a node take the slots of that
difference for missed (then the misfire policy applies to them), so keep clocks within the grace (NTP does).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.db import connections
from django.utils import timezone

from nocluster.db import close_old_connections
from nocluster.errors import UnknownChannel, UnknownJob
from nocluster.identity import NodeIdentity
from nocluster.lifecycle import Component
from nocluster.schedule import outcomes
from nocluster.schedule.claims import CATCH_UP, MANUAL, ClaimStore, JobStatus, run_model
from nocluster.schedule.jobs import PeriodicJob, run_info
from nocluster.schedule.plan import Plan, plan_runs
from nocluster.schedule.settings import ScheduleSettings

if TYPE_CHECKING:
    from nocluster.models import ScheduledJob, ScheduleRun
    from nocluster.queue import EventQueue
    from nocluster.queue.message import Message

logger = logging.getLogger("nocluster.schedule")

# Seconds between two prunes of old run rows by one node.
PRUNE_EVERY = 60.0

Clock = Callable[[], datetime]


class Scheduler(Component):
    """The periodic jobs of this project, and this node's share of running them.

    Parameters:
      identity: this node (its name scopes the rows; its instance id is recorded on the runs it claims).
      event_queue: where each run's message is published.
      settings: ``NOCLUSTER["SCHEDULE"]``.
      clock: returns the current time (aware); ``django.utils.timezone.now`` by default. Tests offset it.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        event_queue: EventQueue,
        settings: ScheduleSettings,
        clock: Clock | None = None,
    ) -> None:
        self.identity = identity
        self.event_queue = event_queue
        self.settings = settings
        self.clock: Clock = clock or timezone.now
        self._jobs: dict[str, PeriodicJob] = {}
        self._lock = threading.Lock()
        self._reset()
        from nocluster.queue.failures import message_failed  # connected once this scheduler exists

        message_failed.connect(self._on_failed)

    def _reset(self) -> None:
        self._started = False
        self._known: dict[str, datetime] = {}  # per job, the latest slot known handled (never ahead of the row)
        self._failing: set[str] = set()
        self._next_prune: datetime | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def store(self) -> ClaimStore:
        return ClaimStore(self.identity.name, self.settings.database)

    # --- declaring jobs -------------------------------------------------------------------------------------
    def add(self, job: PeriodicJob) -> None:
        """Declare ``job`` in this process (every process of the project declares the same jobs, as plugins load
        everywhere). Its channel must be subscribed by the time this node starts.

        Raises:
          TypeError: ``job`` is not a :class:`PeriodicJob`.
          ValueError: another job of that name was declared differently.
          UnknownChannel: after this node started, the job's channel has no subscriber.
          ValueError: after this node started, the job's timeout is longer than the event queue allows.
        """
        if not isinstance(job, PeriodicJob):
            raise TypeError(f"scheduler.add() takes a PeriodicJob, got {type(job).__name__}")
        with self._lock:
            declared = self._jobs.get(job.name)
            if declared is not None and declared != job:
                raise ValueError(f"periodic job {job.name!r} is declared twice, differently: {declared} and {job}")
            self._jobs[job.name] = job
            started = self._started
        if started:
            self._track(job)
            self._start_thread()

    def remove(self, name: str) -> None:
        """Forget job ``name`` in this process (tests and tools; its rows stay)."""
        with self._lock:
            self._jobs.pop(name, None)
            self._known.pop(name, None)

    def jobs(self) -> list[PeriodicJob]:
        """The declared jobs, by name."""
        with self._lock:
            return [self._jobs[name] for name in sorted(self._jobs)]

    def job(self, name: str) -> PeriodicJob:
        """The job ``name``; :class:`~nocluster.errors.UnknownJob` if no plugin declared it."""
        with self._lock:
            job = self._jobs.get(name)
            known = sorted(self._jobs)
        if job is None:
            raise UnknownJob(f"periodic job {name!r} is not declared in app {self.identity.name!r} (known: {known})")
        return job

    # --- operating them -------------------------------------------------------------------------------------
    def run_now(self, name: str) -> ScheduleRun:
        """Publish one message of job ``name`` now, recorded as a manual run (even when the job is disabled); the
        slots go on as before. Returns the run (its ``message_id`` set)."""
        job = self.job(name)
        now = self.clock()
        store = self.store
        with store.atomic():
            store.state(job, now)
            run_id = store.insert_run(job.name, None, MANUAL, 0, self.identity.instance_id, now)
            assert run_id is not None  # a run without a slot never conflicts
            message_id = self._publish(job, None, MANUAL, 0)
            store.set_message(run_id, message_id)
        logger.info("periodic job %r run by hand: message %s", name, message_id, extra={"channel": job.channel})
        return store.runs().get(pk=run_id)

    def enable(self, name: str) -> None:
        """Let job ``name`` run again, from its next slot on (the slots that passed while disabled never run)."""
        self.store.set_enabled(self.job(name), True, self.clock())

    def disable(self, name: str) -> None:
        """Stop claiming the slots of job ``name`` on every node (a run by hand still works)."""
        self.store.set_enabled(self.job(name), False, self.clock())

    def status(self) -> list[JobStatus]:
        """Every declared job with its row and latest run (creates nothing)."""
        jobs = self.jobs()
        store = self.store
        rows: dict[str, ScheduledJob] = {row.name: row for row in store.jobs().filter(name__in=[j.name for j in jobs])}
        now = self.clock()
        result = []
        for job in jobs:
            row = rows.get(job.name)
            enabled, last = (row.enabled, row.last_slot) if row else (job.enabled, None)
            next_run = row.next_run if row else job.schedule.next_after(now)
            result.append(JobStatus(job, enabled, last, next_run, store.latest_run(job.name)))
        return result

    # --- claiming slots --------------------------------------------------------------------------------------
    def tick(self, now: datetime | None = None) -> list[ScheduleRun]:
        """Claim what is due at ``now`` (default: this node's clock) for every job; return the runs this node
        claimed. The scheduler thread calls it; tests call it with chosen times. A job whose claim fails (the
        database is down) is logged and tried again at the next tick."""
        now = now or self.clock()
        claimed: list[ScheduleRun] = []
        for job in self.jobs():
            try:
                claimed += self._tick_job(job, now)
            except Exception as exc:
                self._log_failure(job, exc)
            else:
                if job.name in self._failing:
                    self._failing.discard(job.name)
                    logger.warning("periodic job %r: claims work again", job.name)
        self._prune(now)
        return claimed

    def _tick_job(self, job: PeriodicJob, now: datetime) -> list[ScheduleRun]:
        due = job.schedule.latest_at_or_before(now)
        known = self._known.get(job.name)
        if due is None or (known is not None and due <= known):
            return []
        store = self.store
        state = store.state(job, now)
        last = state.last_slot
        if last is not None and due <= last:
            self._known[job.name] = last  # another node (maybe with a clock ahead) handled it
            return []
        if not state.enabled:
            self._known[job.name] = due  # read again at the next slot
            return []
        runs = self._claim(job, plan_runs(job, last, now, self.settings.grace), due, now)
        self._known[job.name] = due
        return runs

    def _claim(self, job: PeriodicJob, plan: Plan, due: datetime, now: datetime) -> list[ScheduleRun]:
        """In one transaction: insert each planned run (skipping those another node has), publish its message,
        and move the job's ``last_slot`` to ``due``."""
        store, node = self.store, self.identity.instance_id
        runs: list[ScheduleRun] = []
        with store.atomic():
            for slot, kind, missed in plan:
                run_id = store.insert_run(job.name, slot, kind, missed, node, now)
                if run_id is None:
                    continue  # another node claimed this slot
                message_id = self._publish(job, slot, kind, missed)
                store.set_message(run_id, message_id)
                runs.append(
                    run_model()(pk=run_id, app_name=self.identity.name, job=job.name, slot=slot, kind=kind,
                                missed=missed, message_id=message_id, node=node, claimed_at=now)
                )  # fmt: skip
            store.advance(job, due)
        for run in runs:
            log = logger.info if run.kind == CATCH_UP else logger.debug
            log("periodic job %r: %s run of slot %s claimed, message %s", job.name, run.kind,
                run.slot.isoformat() if run.slot else None, run.message_id, extra={"channel": job.channel})  # fmt: skip
        return runs

    def _publish(self, job: PeriodicJob, slot: datetime | None, kind: str, missed: int) -> str:
        payload = job.message_payload(slot, kind, missed)
        return self.event_queue.publish(
            job.channel, payload, timeout=job.timeout, max_retries=job.max_retries, using=self.settings.database
        )

    def _prune(self, now: datetime) -> None:
        if self._next_prune is not None and now < self._next_prune:
            return
        self._next_prune = now + timedelta(seconds=PRUNE_EVERY)
        try:
            self.store.prune(now - timedelta(seconds=self.settings.keep))
        except Exception:
            logger.exception("periodic jobs: old runs not pruned; trying again in %s s", PRUNE_EVERY)

    def _log_failure(self, job: PeriodicJob, exc: Exception) -> None:
        # The whole traceback once; while it keeps failing, one line per tick.
        if job.name not in self._failing:
            self._failing.add(job.name)
            logger.exception("periodic job %r: due slots not claimed; trying again at the next tick", job.name)
        else:
            logger.warning("periodic job %r: still not claimed: %s: %s", job.name, type(exc).__name__, exc)

    # --- outcomes (see nocluster.schedule.outcomes) ----------------------------------------------------------
    def _track(self, job: PeriodicJob) -> None:
        """Check that the job's messages can be published here, and track their outcomes."""
        try:
            subscription = self.event_queue.subscription(job.channel)
        except UnknownChannel as exc:
            raise UnknownChannel(f"periodic job {job.name!r}: {exc}") from None
        problem = self.event_queue.backend.check_timeout(job.timeout)
        if problem:
            raise ValueError(f"periodic job {job.name!r}: {problem}")
        outcomes.track(subscription, self._record)

    def _record(self, message_id: str, outcome: str, error: str) -> None:
        try:
            self.store.settle(message_id, outcome, timezone.now(), error)
        except Exception:
            logger.exception("periodic job message %s: outcome %r not recorded", message_id, outcome)

    def _on_failed(self, sender: object, message: Message, error: str, node: str, **kwargs: Any) -> None:
        if run_info(message.payload) is not None:
            self._record(message.id, outcomes.FAILED, error)

    # --- lifecycle -------------------------------------------------------------------------------------------
    @property
    def claims_here(self) -> bool:
        """Whether this process claims slots (``ENABLED`` and its role in ``ROLES``)."""
        return self.settings.enabled and self.identity.role in self.settings.roles

    def start(self) -> None:
        """Track the outcome of every job's messages run here, then (if this process claims) start the thread.

        Raises:
          UnknownChannel: a job's channel has no subscriber (the message names the job).
          ValueError: a job's timeout is longer than the event queue allows.
        """
        for job in self.jobs():
            self._track(job)
        with self._lock:
            self._started = True
        self._start_thread()

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is not None or not self._jobs or not self.claims_here:
                return
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="nocluster-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            self._started = False
        if thread is None:
            return
        self._stopping.set()
        thread.join(30)
        if thread.is_alive():
            logger.error("scheduler thread did not stop within 30 s")

    def after_fork(self) -> None:
        # The parent's thread is gone; what it knew is re-read from the database.
        self._lock = threading.Lock()
        self._reset()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self.tick()
                finally:
                    close_old_connections()
                self._stopping.wait(self._pause())
        finally:
            connections.close_all()

    def _pause(self) -> float:
        """Seconds until the next slot of any job (at most ``TICK``)."""
        now = self.clock()
        upcoming = [slot for job in self.jobs() if (slot := job.schedule.next_after(now)) is not None]
        if not upcoming:
            return self.settings.tick
        return max(0.01, min(self.settings.tick, (min(upcoming) - now).total_seconds()))
