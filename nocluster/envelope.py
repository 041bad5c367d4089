"""JSON on the wire, and only JSON: validation, canonical form, and the pub/sub envelope.

Payloads are JSON values (dict with str keys, list, str, int, float, bool, None). Anything else is refused
with a ``TypeError`` that names the channel; pickle is never used. What comes off the wire is parsed once into
a typed object (:meth:`Envelope.from_wire`); a message of the wrong shape raises :class:`MalformedMessage`.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from nocluster import tracing
from nocluster.durations import shown
from nocluster.errors import InvalidChannel, MalformedMessage

JSON: TypeAlias = "dict[str, JSON] | list[JSON] | str | int | float | bool | None"

CHANNEL_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]*$")
# Deepest nesting of lists and dicts a payload may have: deeper ones are refused at publish (a clear error
# instead of a RecursionError in a decoder on another node).
MAX_DEPTH = 100
# Longest message id a peer may send (ours are uuid4 hex, 32 characters).
MAX_ID_LENGTH = 64


MAX_KEY_LENGTH = 1000


def ensure_key(key: object, what: str) -> str:
    """Return ``key`` if it is a usable lock or cache key: a non-empty str of at most :data:`MAX_KEY_LENGTH`
    characters that UTF-8 can encode (no lone surrogate). Else ``ValueError`` naming ``what`` (e.g. ``"lock key"``).
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"{what} must be a non-empty str, got {shown(key)}")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"{what} must be at most {MAX_KEY_LENGTH} characters, got {len(key)}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {key!r} cannot be encoded as UTF-8 (lone surrogate)") from None
    return key


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


def _problem(value: Any) -> tuple[str, str] | None:
    """(what it is, what is wrong) for the element ``value`` itself, not its items; None when it is fine."""
    if value is None or isinstance(value, (bool, int, list, tuple)):
        return None
    if isinstance(value, str):
        return None if value.isascii() or encodable(value) else ("a str", "cannot be encoded as UTF-8 (lone surrogate)")
    if isinstance(value, float):
        return None if math.isfinite(value) else (repr(value), "is not valid JSON (NaN/Infinity)")
    if isinstance(value, dict):
        bad = next((key for key in value if not isinstance(key, str) or not encodable(key)), None)
        return None if bad is None else (f"key {bad!r}", "is not a str that UTF-8 can encode; JSON keys are str")
    kinds = "dict, list, str, int, float, bool or None"
    return type(value).__name__, f"is not JSON-serialisable (payloads are {kinds})"


def encodable(text: str) -> bool:
    """Whether UTF-8 can encode ``text`` (False for a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _find(value: Any, path: str, depth: int) -> tuple[str, str, str] | None:
    """(path, what, what is wrong) of the first offending element of ``value``; None when it is all JSON."""
    problem = _problem(value)
    if problem is not None:
        return (path, *problem)
    if isinstance(value, dict):
        items: Any = ((f"{path}.{key}", item) for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    if depth >= MAX_DEPTH:
        return path, "the payload", f"is nested deeper than {MAX_DEPTH} levels"
    for item_path, item in items:
        found = _find(item, item_path, depth + 1)
        if found is not None:
            return found
    return None


def _is_json(payload: Any) -> bool:
    # Iterative and without path strings: the common case (valid JSON) costs a few type checks per element.
    stack: list[tuple[Any, int]] = [(payload, 0)]
    while stack:
        value, depth = stack.pop()
        if _problem(value) is not None:
            return False
        if isinstance(value, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                return False
            for item in value.values() if isinstance(value, dict) else value:
                stack.append((item, depth + 1))
    return True


def ensure_json(channel: str, payload: Any, what: str = "channel") -> JSON:
    """Raise ``TypeError`` naming ``channel`` unless ``payload`` is a JSON value; return it unchanged.

    Refused: non-JSON types, non-str keys, NaN and infinities, a str that UTF-8 cannot encode (a lone
    surrogate) and nesting deeper than :data:`MAX_DEPTH` levels. ``what`` names the kind of place in the
    message (``"channel"``, ``"cache 'auth' key"``...).
    """
    if _is_json(payload):
        return payload
    path, thing, complaint = _find(payload, "$", 0) or ("$", "the payload", "is not JSON")
    if len(path) > 80:
        path = path[:40] + "..." + path[-20:]
    raise TypeError(f"{what} {channel!r}: {thing} at {path} {complaint}")


def dumps(value: JSON) -> str:
    """Compact JSON text."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(value: JSON) -> str:
    """Canonical JSON (sorted keys, compact): equal content gives equal text. Used as the debounce key."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False)


def loads(text: str | bytes) -> JSON:
    result: JSON = json.loads(text)
    return result


def wire_field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``data[name]`` if present and of ``kind`` (``bool`` is never an int here), else :class:`MalformedMessage`."""
    if name not in data:
        raise MalformedMessage(f"{what}: field {name!r} is missing")
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise MalformedMessage(f"{what}: field {name!r} must be {names}, got {type(value).__name__}")
    return value


def wire_number(data: dict[str, Any], name: str, what: str) -> float:
    """``data[name]`` as a finite float (a time stamp, say), else :class:`MalformedMessage`."""
    value = wire_field(data, name, (int, float), what)
    try:
        number = float(value)
    except OverflowError:
        raise MalformedMessage(f"{what}: field {name!r} is too large") from None
    if not math.isfinite(number):
        raise MalformedMessage(f"{what}: field {name!r} must be a finite number, got {value!r}")
    return number


def wire_object(data: object, what: str) -> dict[str, Any]:
    """``data`` if it is a JSON object, else :class:`MalformedMessage`."""
    if not isinstance(data, dict):
        raise MalformedMessage(f"{what} is not a JSON object (got {type(data).__name__})")
    return data


def wire_id(data: dict[str, Any], name: str, what: str) -> str:
    """A non-empty id of at most :data:`MAX_ID_LENGTH` characters."""
    value: str = wire_field(data, name, str, what)
    if not value or len(value) > MAX_ID_LENGTH:
        raise MalformedMessage(f"{what}: field {name!r} must be 1 to {MAX_ID_LENGTH} characters")
    return value


def wire_json(data: dict[str, Any], name: str, what: str) -> JSON:
    """A JSON value that the canonical form and the debouncer can handle (no NaN, no excessive nesting)."""
    if name not in data:
        raise MalformedMessage(f"{what}: field {name!r} is missing")
    try:
        return ensure_json(name, data[name], what=what + ": field")
    except TypeError as exc:
        raise MalformedMessage(str(exc)) from None


@dataclass
class Envelope:
    """What travels on a pub/sub channel around the caller's message."""

    publisher_id: str
    message: JSON
    skip_self: bool = True
    only_self: bool = False
    sent_at: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # The publisher's W3C trace context (``nocluster.tracing``); empty outside a trace.
    trace: dict[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """The JSON object that goes on the wire (``to_json()`` is its text)."""
        wire: dict[str, Any] = {
            "publisher_id": self.publisher_id,
            "message": self.message,
            "skip_self": self.skip_self,
            "only_self": self.only_self,
            "sent_at": self.sent_at,
            "id": self.id,
        }
        if self.trace:
            wire["trace"] = self.trace
        return wire

    def to_json(self) -> str:
        return dumps(self.to_wire())

    @classmethod
    def from_wire(cls, data: object) -> Envelope:
        """Parse a decoded envelope; unknown fields are ignored. Raises :class:`MalformedMessage`."""
        what = "pub/sub envelope"
        fields = wire_object(data, what)
        return cls(
            publisher_id=wire_id(fields, "publisher_id", what),
            message=wire_json(fields, "message", what),
            skip_self=wire_field(fields, "skip_self", bool, what),
            only_self=wire_field(fields, "only_self", bool, what),
            sent_at=wire_number(fields, "sent_at", what),
            id=wire_id(fields, "id", what),
            trace=tracing.from_wire(fields.get("trace")),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        try:
            data = loads(text)
        except ValueError as exc:
            raise MalformedMessage(f"pub/sub envelope is not JSON: {exc}") from None
        return cls.from_wire(data)
