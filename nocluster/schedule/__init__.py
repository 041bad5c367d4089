"""Periodic jobs: ``app.scheduler`` runs each slot of a declared :class:`PeriodicJob` once for the whole cluster.

Re-exports the manager and, unlike the other components, the declaration too: a plugin needs it to declare a job.
"""

from nocluster.schedule.jobs import PeriodicJob, run_info
from nocluster.schedule.manager import Scheduler

__all__ = ["PeriodicJob", "Scheduler", "run_info"]
