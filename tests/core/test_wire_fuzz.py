"""Fuzzing what comes off the wire: decoders raise ``MalformedMessage`` and nothing else, and dispatch never raises.

Anything JSON can carry is tried, including what Python's ``json`` accepts beyond the standard (NaN, infinities,
lone surrogates, huge integers), both as whole values and as valid envelopes with one field replaced. Bounded:
a fixed number of examples per property, no deadline per example.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nocluster import Application, MalformedMessage
from nocluster.envelope import Envelope
from nocluster.queue.message import Message
from nocluster.sync.manager import SyncPayload

LOCAL = "nocluster.pubsub.backends.local.LocalPubSubBackend"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),  # includes lone surrogates, as json.loads("\"\\ud800\"") gives
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)

VALID = {
    Envelope: Envelope(publisher_id="p", message={"a": 1}).to_wire(),
    Message: Message("orders", {"a": 1}, 15.0, 0).to_wire(),
    SyncPayload: SyncPayload(1, "source", {"a": 1}, "m1").to_wire(),
}
DECODERS = [Envelope.from_wire, Message.from_wire, SyncPayload.from_wire]


def one_field_replaced(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(st.sampled_from(sorted(valid)), json_values).map(lambda pair: {**valid, pair[0]: pair[1]})


def deeply_nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def decode_only_malformed(decoder: Any, data: Any) -> None:
    with contextlib.suppress(MalformedMessage):
        decoder(data)


@pytest.mark.parametrize("decoder", DECODERS, ids=lambda decoder: decoder.__qualname__)
@FUZZ
@given(data=json_values)
def test_a_decoder_raises_only_malformed_message_for_any_json(decoder: Any, data: Any) -> None:
    decode_only_malformed(decoder, data)


@pytest.mark.parametrize("kind", list(VALID), ids=lambda kind: kind.__name__)
@FUZZ
@given(data=st.data())
def test_a_decoder_raises_only_malformed_message_for_a_valid_message_with_one_bad_field(kind: Any, data: Any) -> None:
    decode_only_malformed(kind.from_wire, data.draw(one_field_replaced(VALID[kind])))


@pytest.mark.parametrize(("kind", "field"), [(Envelope, "message"), (Message, "payload"), (SyncPayload, "message")])
def test_a_payload_nested_ten_thousand_levels_is_malformed_not_a_recursion_error(kind: Any, field: str) -> None:
    with pytest.raises(MalformedMessage, match="deeper"):
        kind.from_wire({**VALID[kind], field: deeply_nested(10_000)})


@pytest.fixture(scope="module")
def dispatching_app() -> Any:
    app = Application({"NAME": "fuzz", "PUBSUB": {"BACKEND": LOCAL, "OPTIONS": {"bus": "fuzz"}}})
    app.pub_sub_manager.subscribe("plain", lambda message: None)
    app.pub_sub_manager.subscribe("debounced", lambda message: None, debounce=0.05)
    app.pub_sub_manager.start()  # the bus only: no database in these tests
    yield app
    app.pub_sub_manager.stop()
    app.debouncer.stop()


@FUZZ
@given(
    data=st.one_of(json_values, one_field_replaced(VALID[Envelope])), channel=st.sampled_from(["plain", "debounced"])
)
def test_dispatch_never_raises_and_logs_each_bad_envelope_once(
    dispatching_app: Any, data: Any, channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="nocluster"):
        dispatching_app.pub_sub_manager.deliver(f"fuzz.{channel}", data)
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    try:
        Envelope.from_wire(data)
    except MalformedMessage:
        assert len(errors) == 1 and "malformed envelope" in errors[0].getMessage()
    else:
        assert errors == []


def test_the_issue_s_malformed_envelopes_are_dropped_with_one_log_line(
    dispatching_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bad = [
        {**VALID[Envelope], "id": [1]},
        {**VALID[Envelope], "message": json.loads('{"x": NaN}')},
        {**VALID[Envelope], "message": json.loads('"\\ud800"')},
    ]
    for data in bad:
        for channel in ("plain", "debounced"):
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="nocluster"):
                dispatching_app.pub_sub_manager.deliver(f"fuzz.{channel}", data)
            assert [record.getMessage() for record in caplog.records if "malformed envelope" in record.getMessage()]
            assert len(caplog.records) == 1
