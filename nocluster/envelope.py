"""JSON on the wire, and only JSON: validation, canonical form and the pub/sub envelope.

Payloads are JSON values (dict with str keys, list, str, int, float, bool, None). Anything else is refused
with a ``TypeError`` that names the channel; pickle is never used.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, TypeAlias

from nocluster.errors import InvalidChannel

JSON: TypeAlias = "dict[str, JSON] | list[JSON] | str | int | float | bool | None"

CHANNEL_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]*$")


def validate_channel(channel: object) -> str:
    """Return ``channel`` if it is a usable channel name, else raise :class:`InvalidChannel`.

    A channel is a non-empty str of letters, digits and ``_ . : -``, not starting with a separator, at
    most 200 characters.
    """
    if not isinstance(channel, str) or not channel:
        raise InvalidChannel(f"channel name must be a non-empty str, got {channel!r}")
    if len(channel) > 200 or not CHANNEL_PATTERN.match(channel) or channel.endswith("."):
        raise InvalidChannel(
            f"invalid channel name {channel!r}: use letters, digits and _ . : - (at most 200 characters)"
        )
    return channel


def _check(value: Any, where: str, path: str) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{where}: {value!r} at {path} is not valid JSON (NaN/Infinity)")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check(item, where, f"{path}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} at {path} is not a str; JSON keys are str")
            _check(item, where, f"{path}.{key}")
        return
    raise TypeError(
        f"{where}: {type(value).__name__} at {path} is not JSON-serialisable "
        "(payloads are dict, list, str, int, float, bool or None)"
    )


def ensure_json(channel: str, payload: Any, what: str = "channel") -> JSON:
    """Raise ``TypeError`` naming ``channel`` unless ``payload`` is a JSON value; return it unchanged.

    ``what`` names the kind of place in the message (``"channel 'orders'"``, ``"cache 'auth' key 'k'"``...).
    """
    _check(payload, f"{what} {channel!r}", "$")
    return payload


def dumps(value: JSON) -> str:
    """Compact JSON text."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(value: JSON) -> str:
    """Canonical JSON (sorted keys, compact): equal content gives equal text. Used as the debounce key."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False)


def loads(text: str | bytes) -> JSON:
    return json.loads(text)


@dataclass
class Envelope:
    """What travels on a pub/sub channel around the caller's message."""

    publisher_id: str
    message: JSON
    skip_self: bool = True
    only_self: bool = False
    sent_at: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> str:
        return dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        data = loads(text)
        if not isinstance(data, dict):
            raise ValueError("envelope is not a JSON object")
        return cls(**data)
