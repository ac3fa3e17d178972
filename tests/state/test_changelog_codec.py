import numpy as np
import pytest

from streamer.errors import StateError
from streamer.state.changelog import HEADER_BYTES, StateCodec, changelog_topic

SHAPES = {"h": (2, 3), "c": (2, 3)}
FINGERPRINT = "0123456789abcdef"


def test_round_trip():
    codec = StateCodec(SHAPES, "stateful")
    rows = np.random.default_rng(0).normal(size=(3, 12)).astype(np.float32)
    values = codec.encode(FINGERPRINT, np.array([1, 2, 3]), np.array([10, 20, 30]), np.array([-5, 0, 7]), rows)
    assert [len(value) for value in values] == [HEADER_BYTES + 48] * 3
    assert values[0][0] == 1  # format version byte
    records, invalid, other_models = codec.decode(["a", "b", "c"], values)
    assert invalid == []
    assert other_models == []
    assert records.entities == ["a", "b", "c"]
    assert records.fingerprints == [FINGERPRINT] * 3
    assert records.steps.tolist() == [1, 2, 3]
    assert records.last_offsets.tolist() == [10, 20, 30]
    assert records.last_ts_ms.tolist() == [-5, 0, 7]
    assert np.array_equal(records.rows, rows)
    split = codec.split_rows(records.rows)
    assert np.array_equal(split["h"], rows[:, :6].reshape(3, 2, 3))
    assert np.array_equal(split["c"], rows[:, 6:].reshape(3, 2, 3))


def test_floats_are_little_endian_raw():
    codec = StateCodec({"h": (1, 1)}, "stateful")
    value = codec.encode(FINGERPRINT, np.array([1]), np.array([0]), np.array([0]), np.array([[1.5]], np.float32))[0]
    assert value[-4:] == np.float32(1.5).astype("<f4").tobytes()


def test_truncated_and_foreign_records_reported():
    codec = StateCodec(SHAPES, "stateful")
    good = codec.encode(FINGERPRINT, np.array([1]), np.array([1]), np.array([1]), np.zeros((1, 12), np.float32))[0]
    window_codec = StateCodec(SHAPES, "window")
    other = window_codec.encode(FINGERPRINT, np.array([1]), np.array([1]), np.array([1]),
                                np.zeros((1, 12), np.float32))[0]
    larger = StateCodec({"h": (2, 4), "c": (2, 4)}, "stateful").encode(
        "fedcba9876543210", np.array([1]), np.array([1]), np.array([1]), np.zeros((1, 16), np.float32))[0]
    records, invalid, other_models = codec.decode(["ok", "short", "window", "larger"],
                                                  [good, good[:-3], other, larger])
    assert records.entities == ["ok"]
    assert [entity for entity, _ in invalid] == ["short"]
    # Window states and states of another size are another model's: the mismatch policy decides.
    assert sorted(other_models) == ["larger", "window"]


def test_split_rows_checks_size():
    codec = StateCodec(SHAPES, "stateful")
    codec.floats = 13
    with pytest.raises(StateError):
        codec.split_rows(np.zeros((1, 13), np.float32))


def test_changelog_topic_name():
    assert changelog_topic("fraud") == "fraud-state-changelog"


def test_snapshot_round_trip_and_age(tmp_path):
    import time

    from streamer.state.snapshot import Snapshot, read_snapshot, snapshot_path, write_snapshot

    rows = np.arange(24, dtype=np.float32).reshape(2, 12)
    snapshot = Snapshot(topic="g-state-changelog", partition=3, next_offset=42, fingerprint=FINGERPRINT,
                        semantics="stateful", created_s=time.time(), entities=["a", "ß-2"],
                        steps=np.array([1, 2]), last_offsets=np.array([5, 6]), last_ts_ms=np.array([7, 8]), rows=rows)
    path = write_snapshot(tmp_path, snapshot)
    assert path == snapshot_path(tmp_path, "g-state-changelog", 3)
    loaded = read_snapshot(tmp_path, "g-state-changelog", 3)
    assert loaded.entities == ["a", "ß-2"]
    assert loaded.next_offset == 42
    assert np.array_equal(loaded.rows, rows)
    assert loaded.steps.tolist() == [1, 2]
    assert read_snapshot(tmp_path, "g-state-changelog", 4) is None
    snapshot.created_s = time.time() - 13 * 3600
    write_snapshot(tmp_path, snapshot)
    assert read_snapshot(tmp_path, "g-state-changelog", 3) is None  # too old to trust compaction
    path.write_bytes(b"garbage")
    assert read_snapshot(tmp_path, "g-state-changelog", 3) is None
