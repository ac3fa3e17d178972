import json

import numpy as np
import pytest

from streamer import errors
from streamer.errors import InvalidEventError
from streamer.io.events import EventDecoder, EventFormat, parse_timestamp_ms
from streamer.state import NO_TIME


@pytest.fixture
def decoder() -> EventDecoder:
    return EventDecoder(EventFormat(input_size=3, max_record_bytes=2000))


def event(**fields) -> bytes:
    return json.dumps({"entity": "s-1", "features": [1, 2.5, -3], **fields}).encode()


def test_valid_event_decoded(decoder):
    batch, dead = decoder.decode([None], [event(ts=1733300000000, reset=True, target=[1.5])], None, [7], 3)
    assert dead == []
    assert batch.entities == ["s-1"]
    assert batch.features.dtype == np.float32
    assert batch.features.tolist() == [[1.0, 2.5, -3.0]]
    assert batch.ts_ms.tolist() == [1733300000000]
    assert batch.resets.tolist() == [True]
    assert batch.offsets.tolist() == [7]
    assert batch.partitions.tolist() == [3]
    assert batch.targets == [[1.5]]


def test_key_wins_over_entity_field(decoder):
    batch, _ = decoder.decode([b"from-key"], [event()], None, [0])
    assert batch.entities == ["from-key"]


def test_record_timestamp_used_when_ts_absent(decoder):
    batch, _ = decoder.decode([None, None], [event(), event()], [1234, None], [0, 1])
    assert batch.ts_ms.tolist() == [1234, NO_TIME]


def test_iso_timestamps():
    assert parse_timestamp_ms("2024-12-04T08:00:00Z") == 1733299200000
    assert parse_timestamp_ms("2024-12-04T08:00:00") == 1733299200000
    assert parse_timestamp_ms("2024-12-04T09:00:00+01:00") == 1733299200000


def test_named_features():
    decoder = EventDecoder(EventFormat(input_size=2, feature_names=("temp", "load")))
    batch, dead = decoder.decode([None, None], [b'{"entity": "a", "temp": 21.5, "load": 0.7}',
                                                b'{"entity": "a", "temp": 21.5}'], None, [0, 1])
    assert batch.features.tolist() == [[21.5, pytest.approx(0.7)]]
    assert [d.reason for d in dead] == [errors.MISSING_FEATURES]


BAD_RECORDS = [
    (b"{not json", errors.INVALID_JSON),
    (b"[]", errors.NOT_AN_OBJECT),
    (b'{"features": [1, 2, 3]}', errors.MISSING_ENTITY),
    (b'{"entity": "", "features": [1, 2, 3]}', errors.INVALID_ENTITY),
    (b'{"entity": ["x"], "features": [1, 2, 3]}', errors.INVALID_ENTITY),
    (b'{"entity": "a"}', errors.MISSING_FEATURES),
    (b'{"entity": "a", "features": null}', errors.MISSING_FEATURES),
    (b'{"entity": "a", "features": "1,2,3"}', errors.INVALID_FEATURES),
    (b'{"entity": "a", "features": [1, 2]}', errors.FEATURE_COUNT),
    (b'{"entity": "a", "features": ["1", "2", "3"]}', errors.INVALID_FEATURES),
    (b'{"entity": "a", "features": [true, 2, 3]}', errors.INVALID_FEATURES),
    (b'{"entity": "a", "features": [NaN, 2, 3]}', errors.NON_FINITE_FEATURE),
    (b'{"entity": "a", "features": [Infinity, 2, 3]}', errors.NON_FINITE_FEATURE),
    (b'{"entity": "a", "features": [1e999, 2, 3]}', errors.NON_FINITE_FEATURE),
    (b'{"entity": "a", "features": [1e300, 2, 3]}', errors.NON_FINITE_FEATURE),
    (b'{"entity": "a", "features": [1, 2, 3], "ts": "yesterday"}', errors.INVALID_TIMESTAMP),
    (b'{"entity": "a", "features": [1, 2, 3], "ts": true}', errors.INVALID_TIMESTAMP),
    (b'{"entity": "a", "features": [1, 2, 3], "ts": 9223372036854775808}', errors.INVALID_TIMESTAMP),
    (b'{"entity": "a", "features": [1, 2, 3], "ts": -9223372036854775809}', errors.INVALID_TIMESTAMP),
    (b'{"entity": "a", "features": [1, 2, 3], "ts": 4611686018427387904}', errors.INVALID_TIMESTAMP),
    (b'{"entity": "\\ud800", "features": [1, 2, 3]}', errors.INVALID_ENTITY),
    (b'{"entity": "a", "features": [1, 2, 3], "reset": "yes"}', errors.INVALID_RESET),
    (b'{"entity": "a", "features": [1, 2, 3], "target": "high"}', errors.INVALID_TARGET),
    (b'{"entity": "a", "features": [1, 2, 3], "target": NaN}', errors.INVALID_TARGET),
    (b'{"entity": "a", "features": [1, 2, 3], "target": [1, -Infinity]}', errors.INVALID_TARGET),
    (b'{"entity": "a", "features": [1, 2, 3], "ts": NaN}', errors.INVALID_TIMESTAMP),
    (b'{"entity": NaN, "features": [1, 2, 3]}', errors.INVALID_ENTITY),
    (b'{"entity": "a", "features": [1, 2, 3], "reset": NaN}', errors.INVALID_RESET),
    (b'{"entity": "\xff\xfe", "features": [1, 2, 3]}', errors.INVALID_UTF8),
    (b'{"entity": "a", "features": [' + b"0, " * 1000 + b"0]}", errors.RECORD_TOO_LARGE),
    (None, errors.NOT_AN_OBJECT),
]


@pytest.mark.parametrize("value,reason", BAD_RECORDS)
def test_bad_record_has_reason(decoder, value, reason):
    batch, dead = decoder.decode([None], [value], None, [0])
    assert len(batch) == 0
    assert [letter.reason for letter in dead] == [reason]
    assert dead[0].message
    assert reason in errors.INVALID_EVENT_REASONS


def test_out_of_range_timestamp_keeps_valid_events(decoder):
    values = [event(entity="a", ts=1000), event(entity="b", ts=2**62), event(entity="c", ts=None)]
    batch, dead = decoder.decode([None] * 3, values, [5, 6, 7], [0, 1, 2])

    assert batch.entities == ["a", "c"]
    assert batch.ts_ms.tolist() == [1000, 7]
    assert [(letter.index, letter.reason) for letter in dead] == [(1, errors.INVALID_TIMESTAMP)]


def test_invalid_utf8_key_rejected(decoder):
    with pytest.raises(InvalidEventError) as caught:
        decoder.decode_record(b"\xff", event(), None)
    assert caught.value.reason == errors.INVALID_ENTITY


def test_entity_id_beyond_64_bits_rejected(decoder):
    batch, _ = decoder.decode([None], [b'{"entity": 18446744073709551615, "features": [1, 2, 3]}'], None, [0])
    assert batch.entities == ["18446744073709551615"]
    with pytest.raises(InvalidEventError) as caught:
        decoder.decode_record(None, b'{"entity": 18446744073709551616, "features": [1, 2, 3]}', None)
    assert caught.value.reason == errors.INVALID_ENTITY
    assert "at most 64 bits" in str(caught.value)


def test_valid_events_after_bad_ones_kept_in_order(decoder):
    values = [event(entity="a"), b"{oops", event(entity="b", features=[1, 2, float("nan")]), event(entity="c")]
    batch, dead = decoder.decode([None] * 4, values, None, [0, 1, 2, 3])
    assert batch.entities == ["a", "c"]
    assert batch.offsets.tolist() == [0, 3]
    assert batch.record_index.tolist() == [0, 3]
    assert [(d.index, d.reason) for d in dead] == [(1, errors.INVALID_JSON), (2, errors.NON_FINITE_FEATURE)]
    assert dead[0].value == b"{oops"


def test_batch_path_equals_record_path(decoder):
    values = [event(entity=f"e{i % 3}", ts=1000 + i, reset=i == 4, target=float(i), features=[i, 0.5, -i])
              for i in range(8)]
    values += [event(entity="k", features=[1, 2, 3])]  # no ts: the record timestamp is used
    fast, fast_dead = decoder.decode([None] * 9, values, [7] * 9, range(9))
    slow, slow_dead = decoder.decode([None] * 10, values + [b"{broken"], [7] * 10, range(10))
    assert fast_dead == []
    assert [d.reason for d in slow_dead] == [errors.INVALID_JSON]
    assert fast.entities == slow.entities
    assert np.array_equal(fast.features, slow.features)
    assert fast.ts_ms.tolist() == slow.ts_ms.tolist()
    assert fast.ts_ms.tolist()[-1] == 7
    assert fast.resets.tolist() == slow.resets.tolist()
    assert fast.targets == slow.targets
    assert fast.offsets.tolist() == slow.offsets.tolist()


def test_batch_path_rejects_what_record_path_rejects(decoder):
    for value, reason in BAD_RECORDS:
        batch, dead = decoder.decode([None, None], [event(), value], None, [0, 1])
        assert batch.entities == ["s-1"], reason
        assert [letter.reason for letter in dead] == [reason]


def test_target_length_must_match_outputs():
    decoder = EventDecoder(EventFormat(input_size=3, output_size=2))
    values = [event(entity="a", target=[1.0, 2.0]), event(entity="b", target=[1.0, 2.0, 3.0]),
              event(entity="c", target=1.0)]

    batch, dead = decoder.decode([None] * 3, values, None, [0, 1, 2])

    assert batch.entities == ["a"]
    assert [(letter.index, letter.reason) for letter in dead] == [(1, errors.INVALID_TARGET),
                                                                 (2, errors.INVALID_TARGET)]
    assert "the model has 2 outputs" in dead[0].message


def test_non_finite_number_in_an_unused_field_accepted(decoder):
    # Python's json.dumps writes NaN and Infinity; only the fields an event uses must be finite.
    values = [b'{"entity": "a", "features": [1, 2, 3], "note": NaN, "extra": [Infinity]}', event(entity="b")]
    batch, dead = decoder.decode([None, None], values, None, [0, 1])
    assert dead == []
    assert batch.entities == ["a", "b"]


@pytest.mark.parametrize("value,shown", [(b'{"entity": "a", "features": [1, 1e999, 3]}', "inf"),
                                         (b'{"entity": "a", "features": [1, 2, -1e300]}', "-1e+300"),
                                         (b'{"entity": "a", "features": [1, "2", 3]}', '"2"'),
                                         (b'{"entity": "a", "features": [1, null, 3]}', "null")])
def test_bad_feature_message_shows_the_value(decoder, value, shown):
    _, dead = decoder.decode([None], [value], None, [0])
    assert f"Invalid feature {shown}" in dead[0].message or f"Invalid feature value {shown}" in dead[0].message
