"""The one error hierarchy of nocluster. Every message names the channel, key, plugin or setting at fault."""

from __future__ import annotations


class NoclusterError(Exception):
    """Base class of every error nocluster raises on purpose."""


class PluginError(NoclusterError):
    """A plugin failed in a lifecycle hook; the message names the plugin and the hook."""

    def __init__(self, plugin: str, hook: str, cause: BaseException) -> None:
        self.plugin = plugin
        self.hook = hook
        super().__init__(f"plugin {plugin!r} failed in {hook}(): {type(cause).__name__}: {cause}")


class PublishError(NoclusterError):
    """A message could not be handed to the broker."""


class InvalidChannel(NoclusterError, ValueError):
    """A channel name is empty or malformed."""


class UnknownChannel(NoclusterError):
    """A queue message was published to a channel that nothing subscribed to."""


class LockError(NoclusterError):
    """Base class of lock errors."""


class LockAcquireError(LockError):
    """A lock was not acquired in time; the message names the key."""


class LockNotOwned(LockError):
    """A lock was released or extended by a holder that had lost it (its ttl passed or it was forced)."""


class BackendUnavailable(NoclusterError):
    """A backend's server could not be reached."""


class Aborted(NoclusterError):
    """Raised by ``signal.throw_if_aborted()``: the work's timeout passed or it was cancelled."""


class MalformedMessage(NoclusterError, ValueError):
    """A message from the wire does not have the shape its kind requires; it is logged and dropped."""


class QueueStopped(PublishError):
    """A message was published to an event queue that was stopped; the message names the channel."""


class UnknownJob(NoclusterError, LookupError):
    """A periodic job that no plugin declared in this project; the message names it."""
