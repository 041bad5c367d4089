"""Locks across the cluster: ``app.lock_manager`` (see :class:`~nocluster.locks.manager.LockManager`)."""

from __future__ import annotations

from nocluster.locks.lock import Lock
from nocluster.locks.manager import LockManager

__all__ = ["Lock", "LockManager"]
