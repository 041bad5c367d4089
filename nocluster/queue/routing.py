"""Which subscribed channels a node consumes: every one, or those it was told.

Every process of the project registers the same subscriptions; a worker can be limited to some of them
(``celery -A nocluster.celery worker --channels=a,b``, or ``NOCLUSTER_WORKER_CHANNELS=a,b`` for any node, which
``settings/base.py`` puts in ``NOCLUSTER["EVENT_QUEUE"]["CHANNELS"]``). A name nobody subscribed is an error when
the node starts, so a typo never leaves a channel silently unconsumed.
"""

from __future__ import annotations

from nocluster.envelope import validate_channel
from nocluster.errors import InvalidChannel, UnknownChannel


def channel_list(value: object, what: str) -> tuple[str, ...] | None:
    """``"a,b"`` or ``["a", "b"]`` -> ``("a", "b")``; None, ``""`` or ``[]`` -> None (every channel).

    Raises:
      InvalidChannel: an entry is not a channel name, or ``value`` is neither a str nor a list of them (naming
        ``what``).
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)):
        raise InvalidChannel(f'{what} must be a list of channel names or a str "a,b", got {type(value).__name__}')
    names: list[str] = []
    for entry in value:
        name = entry.strip() if isinstance(entry, str) else entry
        if name == "":
            continue
        try:
            names.append(validate_channel(name))
        except InvalidChannel as exc:
            raise InvalidChannel(f"{what}: {exc}") from None
    return tuple(dict.fromkeys(names)) or None


class Routing:
    """The channels a node consumes (``channels`` None: every subscribed one), and where that was said."""

    def __init__(self, channels: tuple[str, ...] | None = None, source: str = "") -> None:
        self.channels = channels
        self.source = source

    def consumes(self, channel: str) -> bool:
        return self.channels is None or channel in self.channels

    def check(self, subscribed: list[str]) -> None:
        """Raise :class:`UnknownChannel` naming the source when a routed channel has no subscription."""
        unknown = [channel for channel in self.channels or () if channel not in subscribed]
        if unknown:
            raise UnknownChannel(
                f"{self.source} names event queue channel(s) nothing subscribed: {', '.join(map(repr, unknown))} "
                f"(subscribed: {', '.join(subscribed) or 'none'})"
            )
