"""compact_json: the event log's and the webhooks' line for a record (events/types.py), by orjson, with the
standard encoder for what orjson refuses."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from postmux.events.types import Event, EventType, compact_json
from postmux.reply import Reply
from postmux.text import readable

# Finite floats: the records hold times and durations; orjson writes null where json wrote Infinity, no JSON.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
)
# Lone surrogates too (hypothesis leaves them out of text by default): how octets that are not UTF-8 arrive.
TEXT = st.text(st.characters(blacklist_categories=()), max_size=12)
VALUES = st.recursive(
    SCALARS | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def valid(value: Any) -> Any:
    """What a reader gets back: the record with every string made readable (test_readable_text.py)."""
    if isinstance(value, str):
        return readable(value)
    if isinstance(value, dict):
        return {readable(k): valid(v) for k, v in value.items()}
    if isinstance(value, list):
        return [valid(v) for v in value]
    return value


@given(st.dictionaries(TEXT, VALUES, max_size=8))
def test_a_record_reads_back_as_the_standard_encoder_would_write_it_on_one_line(
    record: dict[str, Any],
) -> None:
    line = compact_json(record)
    line.encode("utf-8")  # strict: every string is valid Unicode, whatever the record held
    assert "\n" not in line and "\r" not in line  # one record, one line of the log
    assert json.loads(line) == valid(record)


def test_text_with_octets_that_are_not_utf_8_is_written_with_replacement_characters() -> None:
    helo = b"h\xfcst.example".decode("utf-8", "surrogateescape")  # as aiosmtpd hands a HELO name over
    line = Event(EventType.RECEPTION, helo=helo, tags={"k\udcff": "v"}).as_json()
    record = json.loads(line)
    assert (record["helo"], record["tags"]) == ("h\ufffdst.example", {"k\ufffd": "v"})


def test_an_integer_past_64_bits_is_written_whole() -> None:
    assert json.loads(compact_json({"n": 2**70, "s": "x"})) == {"n": 2**70, "s": "x"}


def test_a_delivery_record_is_the_same_line_the_standard_encoder_wrote() -> None:
    event = Event(
        EventType.DELIVERY,
        id="0192abc",
        sender="app@example.com",
        recipient="ü@dest.test",
        response=Reply(250, "2.0.0", "Ok: queued"),
        num_attempts=1,
        latency_s=0.0031234567,
        size=1534,
        created=1796102299.97205,
    )
    record = event.as_record()
    assert event.as_json() == json.dumps(record, separators=(",", ":"), ensure_ascii=False)
