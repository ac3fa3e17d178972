"""The peer implementations in benchmarks/peers compute what streamer computes, without a broker.

benchmarks/compare.py checks every peer through Kafka. These tests check, in the project's environment, the
LSTM step that the aiokafka loop, Quix Streams and faust peers share (``common.step``) and the naive window.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from streamer.backtest.file_replay import run_file_backtest
from streamer.model import SeedNet, load_model

PEERS_DIRECTORY = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS_DIRECTORY))
import common  # noqa: E402  (benchmarks/peers/common.py)

EVENTS = 240
ENTITIES = 4  # about 60 events each, so the 30-event window fills for most entities


@pytest.fixture
def replay(tmp_path: Path):
    """Write the seed model and seeded events; return (model path, events, run(semantics) -> outputs)."""
    torch.manual_seed(0)
    net = SeedNet(common.INPUT, common.HIDDEN, common.WINDOW, common.OUTPUT, common.LAYERS).eval()
    model_path = tmp_path / "seed.pt"
    torch.save(net.state_dict(), model_path)
    rng = np.random.default_rng(7)
    events = [{"entity": f"e-{int(rng.integers(ENTITIES))}", "features": rng.standard_normal(common.INPUT).round(4).tolist()}
              for _ in range(EVENTS)]
    input_path = tmp_path / "events.jsonl"
    input_path.write_bytes(b"".join(orjson.dumps(event) + b"\n" for event in events))

    def run(semantics: str) -> list[dict]:
        model = load_model(model_path, seq_len=common.WINDOW if semantics == "window" else None)
        output_path = tmp_path / f"{semantics}.jsonl"
        run_file_backtest(model, input_path, output_path, semantics=semantics, progress=False)
        return [orjson.loads(line) for line in output_path.read_bytes().splitlines()]

    return model_path, events, run


def test_state_step_matches_stateful(replay) -> None:
    model_path, events, run = replay
    net = common.load_net(str(model_path))
    states = {}
    predictions = []
    with torch.inference_mode():
        for event in events:
            h, c = states.get(event["entity"]) or common.zero_state()
            prediction, h, c = common.step(net, event["features"], h, c)
            states[event["entity"]] = (h, c)
            predictions.append(prediction)
    expected = [output["prediction"] for output in run("stateful")]
    assert len(expected) == len(predictions)
    assert np.abs(np.asarray(expected) - np.asarray(predictions)).max() <= 1e-5


def test_naive_window_matches_window(replay) -> None:
    model_path, events, run = replay
    net = common.load_net(str(model_path))
    windows = collections.defaultdict(lambda: collections.deque(maxlen=common.WINDOW))
    predictions = []
    with torch.inference_mode():
        for event in events:
            window = windows[event["entity"]]
            window.append(event["features"])
            predictions.append(net(torch.tensor([list(window)], dtype=torch.float32))[0].tolist())
    expected = [output["prediction"] for output in run("window")]
    assert len(expected) == len(predictions)
    assert np.abs(np.asarray(expected) - np.asarray(predictions)).max() <= 1e-5
