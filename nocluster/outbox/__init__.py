"""The transactional outbox: messages published inside ``atomic()`` commit or roll back with the caller's data."""

from nocluster.outbox.manager import Outbox, OutboxSettings

__all__ = ["Outbox", "OutboxSettings"]
