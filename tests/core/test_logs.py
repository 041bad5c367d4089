"""Structured log lines: one JSON object per line carrying the node's instance id and the context given."""

from __future__ import annotations

import json
import logging

from nocluster import app
from nocluster.logs import JSONFormatter, NodeContextFilter, TextFormatter


def record(message: str = "delivered %s", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("nocluster.pubsub", logging.WARNING, __file__, 1, message, args or ("m1",), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    NodeContextFilter().filter(rec)
    return rec


def test_a_json_line_carries_the_instance_id_and_the_context_given() -> None:
    line = JSONFormatter().format(record(channel="orders", message_id="abc", lock_key=None))
    entry = json.loads(line)
    assert entry["message"] == "delivered m1"
    assert entry["level"] == "WARNING" and entry["logger"] == "nocluster.pubsub"
    assert entry["instance_id"] == app.instance_id
    assert entry["channel"] == "orders" and entry["message_id"] == "abc"
    assert "lock_key" not in entry and "\n" not in line


def test_a_json_line_keeps_the_traceback() -> None:
    try:
        raise ValueError("bad payload")
    except ValueError:
        import sys

        rec = record(task_id=7)
        rec.exc_info = sys.exc_info()
    entry = json.loads(JSONFormatter().format(rec))
    assert entry["task_id"] == 7
    assert "ValueError: bad payload" in entry["exc_info"]


def test_the_text_format_appends_the_context() -> None:
    line = TextFormatter().format(record(channel="orders", task_id=3))
    assert line.endswith("delivered m1 channel=orders task_id=3")
    assert app.instance_id[:8] in line
