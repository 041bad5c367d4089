"""The event queue: ``app.event_queue`` runs asynchronous, retryable work on any node."""

from nocluster.queue.manager import EventQueue

__all__ = ["EventQueue"]
