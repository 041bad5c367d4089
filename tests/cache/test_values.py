"""The fast JSON check of cache values accepts only what ``ensure_json`` accepts, with the same errors."""

from __future__ import annotations

import datetime
import enum
from collections import OrderedDict
from typing import Any

import pytest

from nocluster.cache.values import checked, is_plain_json
from nocluster.envelope import MAX_DEPTH, ensure_json


class Colour(enum.IntEnum):
    RED = 1


class Text(str):
    pass


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


TRICKY: list[Any] = [
    {"a": [1, 2.5, "x", True, None]},
    {"é": "ü", "emoji": "🙂"},
    (1, 2),
    {1: "int key"},
    {True: "bool key"},
    {None: "none key"},
    float("nan"),
    float("inf"),
    [float("-inf")],
    "\udc80",
    {"\udc80": 1},
    {"k": ["\ud800"]},
    datetime.date(2026, 1, 1),
    {1, 2},
    b"bytes",
    Colour.RED,
    Text("sub"),
    OrderedDict(a=1),
    nested(MAX_DEPTH - 1),
    nested(MAX_DEPTH),
    nested(MAX_DEPTH + 1),
    nested(40),
]


def verdict(check: Any, value: Any) -> str:
    try:
        check(value)
    except TypeError as exc:
        return f"refused: {exc}"
    return "accepted"


@pytest.mark.parametrize("value", TRICKY, ids=lambda value: type(value).__name__)
def test_the_fast_check_agrees_with_ensure_json(value: Any) -> None:
    # The fast path may say "not sure" (False) for a valid value, never "fine" for an invalid one
    assert verdict(lambda v: checked(v, "k", "cache 'c' key"), value) == verdict(
        lambda v: ensure_json("k", v, what="cache 'c' key"), value
    )
    if is_plain_json(value, 0):
        assert ensure_json("k", value) is value
