"""The parity tests on a CUDA device: skipped (never passed) on machines without one."""

import numpy as np
import pytest
import torch

from streamer.engine import Engine
from streamer.model import load_model
from tests.engine.test_parity import TOLERANCE, make_stream, reference, run_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("semantics", ["stateful", "window"])
def test_gpu_outputs_equal_reference(seed_net_factory, cell, semantics):
    net, path = seed_net_factory(cell, 4, 32, 2, 1, seed=3)
    rng = np.random.default_rng(4)
    entities, features, resets = make_stream(rng, 300, 11, 4, reset_rate=0.02)
    model = load_model(path, seq_len=6, device="cuda")
    predictions, engine = run_engine(model, semantics, entities, features, resets, [64, 7, 300])
    expected = reference(net, entities, features, resets, window=6 if semantics == "window" else None)
    assert np.abs(predictions - expected).max() < TOLERANCE
    assert engine.arena.device.type == "cuda"


def test_gpu_state_stays_on_device(seed_net_factory):
    _, path = seed_net_factory("lstm")
    engine = Engine(load_model(path, device="cuda"))
    from streamer.engine import EventBatch

    engine.process(EventBatch.build(["a", "b"], np.ones((2, 4), np.float32)))
    assert engine.arena.gather("h", np.array([0, 1])).is_cuda
