"""Output values and JSON Lines are byte-identical to orjson encoding each document on its own."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest

from streamer.engine.batch import EventBatch, StepResult
from streamer.io.files import OutputWriter, read_outputs
from streamer.io.outputs import encode_output_lines, encode_outputs, file_source, topic_source

AWKWARD_ENTITIES = ['},{"entity":"x', 'quote " and \\ backslash', "naïve 東京", "", "a\nb", '{"entity":'] * 3


def awkward_batch() -> tuple[EventBatch, StepResult, list]:
    n = len(AWKWARD_ENTITIES)
    targets = [None if i % 3 else [float(i), -0.5] for i in range(n)]
    batch = EventBatch.build(AWKWARD_ENTITIES, np.zeros((n, 2)), ts_ms=np.arange(n) * 1000, targets=targets)
    applied = np.ones(n, bool)
    applied[4] = False
    result = StepResult(np.random.default_rng(0).normal(size=(n, 1)).astype(np.float32), np.arange(n), applied)
    return batch, result, targets


def test_outputs_equal_per_document_encoding():
    batch, result, targets = awkward_batch()
    n = len(batch)

    encoded = encode_outputs(batch, result, "fp", file_source("in.jsonl", batch))

    assert [position for position, _, _ in encoded] == [i for i in range(n) if i != 4]
    for position, key, value in encoded:
        expected = {"entity": AWKWARD_ENTITIES[position], "ts": position * 1000, "step": position,
                    "prediction": result.predictions[position].tolist(), "model": "fp",
                    "source": {"file": "in.jsonl", "record": position}}
        if targets[position] is not None:
            expected["target"] = targets[position]
        assert key == AWKWARD_ENTITIES[position].encode()
        assert value == orjson.dumps(expected)


def test_no_applied_events_give_no_outputs():
    batch = EventBatch.build(["a", "b"], np.zeros((2, 2)))
    result = StepResult(np.full((2, 1), np.nan, np.float32), np.full(2, -1), np.zeros(2, bool))

    assert encode_outputs(batch, result, "fp", file_source("in.jsonl", batch)) == []


def test_output_lines_equal_joined_outputs():
    batch, result, _ = awkward_batch()
    encoded = encode_outputs(batch, result, "fp", file_source("in.jsonl", batch))

    count, lines = encode_output_lines(batch, result, "fp", file_source("in.jsonl", batch))

    assert count == len(encoded) == len(batch) - 1
    assert lines == b"".join(value + b"\n" for _, _, value in encoded)
    assert [orjson.loads(line)["entity"] for line in lines.splitlines()] == [
        entity for i, entity in enumerate(AWKWARD_ENTITIES) if i != 4]


def test_output_lines_of_no_outputs_are_empty():
    batch = EventBatch.build(["a"], np.zeros((1, 2)))
    result = StepResult(np.full((1, 1), np.nan, np.float32), np.full(1, -1), np.zeros(1, bool))

    assert encode_output_lines(batch, result, "fp", file_source("in.jsonl", batch)) == (0, b"")


def test_writer_takes_lines_for_json_lines_only(tmp_path):
    with OutputWriter(tmp_path / "out.jsonl") as writer:
        assert writer.writes_lines
        writer.write_lines(2, b'{"a":1}\n{"a":2}\n')
        writer.write([b'{"a":3}'])
    assert (tmp_path / "out.jsonl").read_bytes() == b'{"a":1}\n{"a":2}\n{"a":3}\n'
    assert writer.count == 3

    with OutputWriter(tmp_path / "out.parquet") as parquet:
        assert not parquet.writes_lines
        with pytest.raises(ValueError, match="Parquet"):
            parquet.write_lines(1, b'{"a":1}\n')


def test_topic_source_follows_record_index():
    # Record 1 of the fetch was a dead letter, so the batch's events come from records 0, 2 and 3.
    built = EventBatch.build(["a", "b", "c"], np.zeros((3, 2)), offsets=np.array([10, 12, 13]),
                             partitions=np.array([0, 1, 1]))
    batch = dataclasses.replace(built, record_index=np.array([0, 2, 3]))
    topics = ["t0", "t-dead", "t1", "t2"]

    sources = topic_source(topics, batch)([0, 2])

    assert sources == [{"topic": "t0", "partition": 0, "offset": 10}, {"topic": "t2", "partition": 1, "offset": 13}]


def test_parquet_keeps_targets_after_rows_without(tmp_path):
    rows = [{"entity": "a", "step": 1}, {"entity": "b", "step": 1}, {"entity": "a", "step": 2, "target": 1.5},
            {"entity": "b", "step": 2, "target": [2.0, 3.0]}, {"entity": "c", "step": 1}]
    with OutputWriter(tmp_path / "out.parquet", parquet_rows_per_group=2) as writer:
        writer.write([orjson.dumps(row) for row in rows])

    outputs = read_outputs(tmp_path / "out.parquet")

    assert [output.get("target") for output in outputs] == [None, None, [1.5], [2.0, 3.0], None]
    assert "target" not in outputs[0]


def test_parquet_types_hold_across_row_groups(tmp_path):
    def row(step, ts, target):
        return {"entity": "a", "ts": ts, "step": step, "prediction": [float(step)], "model": "m",
                "source": {"file": "f", "record": step}, "target": target}

    # The first row group alone would give whole-number targets and timestamps that are all missing.
    rows = [row(1, None, 3), row(2, None, 4), row(3, 1000, 2.5), row(4, 1001, [1.25])]
    with OutputWriter(tmp_path / "out.parquet", parquet_rows_per_group=2) as writer:
        for value in rows:
            writer.write([orjson.dumps(value)])

    outputs = read_outputs(tmp_path / "out.parquet")

    assert [output["target"] for output in outputs] == [[3.0], [4.0], [2.5], [1.25]]
    assert [output["ts"] for output in outputs] == [None, None, 1000, 1001]


def test_failed_close_leaves_no_staging_file(tmp_path, monkeypatch):
    path = tmp_path / "out.parquet"
    writer = OutputWriter(path)
    writer.write([orjson.dumps({"entity": "a", "step": 1})])
    monkeypatch.setattr(writer, "_flush_parquet", lambda: (_ for _ in ()).throw(ValueError("disk full")))
    with pytest.raises(ValueError, match="disk full"):
        writer.close()
    assert list(tmp_path.iterdir()) == []
