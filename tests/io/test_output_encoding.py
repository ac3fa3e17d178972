"""Output values are byte-identical to orjson encoding each document on its own."""

from __future__ import annotations

import numpy as np
import orjson

from streamer.engine.batch import EventBatch, StepResult
from streamer.io.outputs import encode_outputs, file_source

AWKWARD_ENTITIES = ['},{"entity":"x', 'quote " and \\ backslash', "naïve 東京", "", "a\nb", '{"entity":'] * 3


def test_outputs_equal_per_document_encoding():
    n = len(AWKWARD_ENTITIES)
    targets = [None if i % 3 else [float(i), -0.5] for i in range(n)]
    batch = EventBatch.build(AWKWARD_ENTITIES, np.zeros((n, 2)), ts_ms=np.arange(n) * 1000, targets=targets)
    applied = np.ones(n, bool)
    applied[4] = False
    result = StepResult(np.random.default_rng(0).normal(size=(n, 1)).astype(np.float32), np.arange(n), applied)

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
