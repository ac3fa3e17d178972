"""The synthetic event generator: determinism, counts, JSON validity, entity skew."""

from __future__ import annotations

import math
from collections import Counter

import orjson
import pytest

from streamer.data.synthetic import DEFAULT_START_TS, iter_event_batches, write_synthetic


def _events(*args, **kwargs) -> list[dict]:
    return [orjson.loads(item) for batch in iter_event_batches(*args, **kwargs) for item in batch]


def test_same_seed_same_bytes():
    first = list(iter_event_batches(5000, 100, 4, 1000, 7, with_target=True))
    second = list(iter_event_batches(5000, 100, 4, 1000, 7, with_target=True))

    assert first == second


def test_other_seed_other_events():
    first = list(iter_event_batches(1000, 100, 4, 1000, 1))
    second = list(iter_event_batches(1000, 100, 4, 1000, 2))

    assert first != second


def test_batch_size_does_not_change_events():
    small = b"\n".join(item for batch in iter_event_batches(150_000, 50, 3, 777, 3) for item in batch)
    large = b"\n".join(item for batch in iter_event_batches(150_000, 50, 3, 100_000, 3) for item in batch)

    assert small == large


def test_batch_counts():
    batches = list(iter_event_batches(2500, 10, 2, 1000, 0))

    assert [len(batch) for batch in batches] == [1000, 1000, 500]


def test_zero_events_yield_nothing():
    assert list(iter_event_batches(0, 10, 2, 1000, 0)) == []


def test_events_valid_json_with_fields():
    events = _events(2000, 300, 5, 512, 0)

    for event in events:
        assert set(event) == {"entity", "ts", "features", "reset"}
        assert event["entity"].startswith("e-")
        assert 0 <= int(event["entity"][2:]) < 300
        assert len(event["features"]) == 5
        assert all(math.isfinite(value) for value in event["features"])
        assert event["reset"] is False


def test_timestamps_strictly_increasing():
    events = _events(3000, 20, 2, 1000, 0, ts_step_ms=5)

    timestamps = [event["ts"] for event in events]

    assert timestamps[0] == DEFAULT_START_TS
    assert all(later - earlier == 5 for earlier, later in zip(timestamps, timestamps[1:]))


def test_scalar_and_vector_targets():
    scalar = _events(100, 10, 3, 100, 0, with_target=True)
    vector = _events(100, 10, 3, 100, 0, with_target=True, target_size=2)

    assert all(isinstance(event["target"], float) for event in scalar)
    assert all(len(event["target"]) == 2 for event in vector)


def test_reset_probability():
    events = _events(20_000, 10, 1, 5000, 0, reset_probability=0.1)

    share = sum(event["reset"] for event in events) / len(events)

    assert 0.08 < share < 0.12


def test_uniform_entities_cover_all():
    counts = Counter(event["entity"] for event in _events(50_000, 100, 1, 10_000, 0))

    assert len(counts) == 100
    assert max(counts.values()) < 2 * min(counts.values())


def test_zipf_entities_skewed():
    counts = Counter(event["entity"] for event in _events(50_000, 10_000, 1, 10_000, 0, zipf_exponent=1.2))

    top = counts.most_common(1)[0]
    top_ten_share = sum(count for _, count in counts.most_common(10)) / 50_000

    assert top[0] == "e-0"
    assert counts["e-0"] > counts["e-1"] > counts["e-9"]
    assert top_ten_share > 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_entities": 0}, "n_entities"),
        ({"input_size": 0}, "input_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"zipf_exponent": 0.0}, "zipf_exponent"),
        ({"reset_probability": 1.5}, "reset_probability"),
    ],
)
def test_invalid_arguments_rejected(kwargs, message):
    arguments = {"n_events": 10, "n_entities": 5, "input_size": 2, "batch_size": 5, "seed": 0} | kwargs

    with pytest.raises(ValueError, match=message):
        list(iter_event_batches(**arguments))


def test_write_synthetic_lines(tmp_path):
    path = tmp_path / "events.jsonl"

    written = write_synthetic(path, 1234, 50, 3, seed=4, with_target=True)

    lines = path.read_bytes().splitlines()
    assert written == 1234
    assert len(lines) == 1234
    assert orjson.loads(lines[0]) == _events(1, 50, 3, 10, 4, with_target=True)[0]


def test_write_synthetic_rejects_other_suffix(tmp_path):
    with pytest.raises(ValueError, match="jsonl"):
        write_synthetic(tmp_path / "events.csv", 10, 5, 2)


def test_shorter_stream_is_prefix():
    long = [item for batch in iter_event_batches(70_000, 40, 2, 70_000, 5, with_target=True) for item in batch]
    short = [item for batch in iter_event_batches(100, 40, 2, 100, 5, with_target=True) for item in batch]

    assert long[:100] == short


def test_entity_prefix_escaped():
    events = _events(10, 3, 2, 10, 0, entity_prefix='sensor "a"/é-')

    assert all(event["entity"].startswith('sensor "a"/é-') for event in events)


def test_reset_values_are_json_booleans():
    events = _events(200, 3, 1, 200, 0, reset_probability=0.5)

    assert {event["reset"] for event in events} == {True, False}
