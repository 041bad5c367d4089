"""nocluster: the cluster-mode plugin runtime for Django. Importing it starts nothing.

Public names: ``app`` (the process-wide :class:`~nocluster.app.Application`), :class:`Plugin` and the errors.
"""

from nocluster.app import Application, app
from nocluster.errors import (
    Aborted,
    BackendUnavailable,
    InvalidChannel,
    LockAcquireError,
    LockError,
    LockNotOwned,
    MalformedMessage,
    NoclusterError,
    PluginError,
    PublishError,
    QueueStopped,
    UnknownChannel,
)
from nocluster.plugin import Plugin

__all__ = [
    "Aborted",
    "Application",
    "BackendUnavailable",
    "InvalidChannel",
    "LockAcquireError",
    "LockError",
    "LockNotOwned",
    "MalformedMessage",
    "NoclusterError",
    "Plugin",
    "PluginError",
    "PublishError",
    "QueueStopped",
    "UnknownChannel",
    "app",
]
