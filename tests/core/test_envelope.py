"""JSON only on the wire: validation naming the channel, canonical form, channel names, the envelope."""

from __future__ import annotations

import datetime
import decimal

import pytest

from nocluster import InvalidChannel
from nocluster.envelope import Envelope, canonical, ensure_json, validate_channel


@pytest.mark.parametrize(
    "payload",
    [{"a": [1, 2.5, "x", True, None]}, [], "text", 0, -1.5, None, {"nested": {"deep": [{"k": "v"}]}}],
)
def test_json_values_are_accepted_unchanged(payload: object) -> None:
    assert ensure_json("orders", payload) is payload


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        ({"when": datetime.datetime(2026, 1, 1)}, "datetime at $.when"),
        ({"amount": decimal.Decimal("1.5")}, "Decimal at $.amount"),
        ([1, {2, 3}], "set at $[1]"),
        ({1: "int key"}, "key 1"),
        ({"x": float("nan")}, "NaN"),
        (b"bytes", "bytes at $"),
        (object(), "object at $"),
    ],
)
def test_non_json_payloads_are_refused_with_the_channel_named(payload: object, where: str) -> None:
    with pytest.raises(TypeError) as excinfo:
        ensure_json("orders.created", payload)
    assert "'orders.created'" in str(excinfo.value)
    assert where in str(excinfo.value)


def test_canonical_json_is_equal_for_equal_content() -> None:
    assert canonical({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == canonical({"a": [1, {"c": 3, "d": 2}], "b": 1})
    assert canonical({"a": 1}) != canonical({"a": 2})


@pytest.mark.parametrize("name", ["orders", "sync.auth", "a:b-c_d.e", "plugin_1.task.cancel"])
def test_valid_channel_names(name: str) -> None:
    assert validate_channel(name) == name


@pytest.mark.parametrize("name", ["", " ", "has space", ".leading", "trailing.", "x" * 201, None, 5, "a/b", "ä"])
def test_invalid_channel_names_get_a_clear_error(name: object) -> None:
    with pytest.raises(InvalidChannel, match="channel name"):
        validate_channel(name)


def test_envelope_round_trips_through_json() -> None:
    envelope = Envelope(publisher_id="node-1", message={"k": [1, 2]}, skip_self=False)
    decoded = Envelope.from_json(envelope.to_json())
    assert decoded == envelope
    assert len(decoded.id) == 32 and decoded.sent_at > 0
