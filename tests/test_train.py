"""Training the seed network: windows, loss curve, determinism, scaling, holdout accuracy and bundles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamer.data import FEATURE_NAMES, load_fertility_events
from streamer.model import SeedNet, load_model, read_model_file
from streamer.train import build_windows, evaluate_windows, fit_seed_net, train_bundle, train_seed_net

# Small settings keep each training run to a few seconds on two CPU cores.
FAST = {"seq_len": 6, "hidden_size": 16, "num_layers": 1, "epochs": 8, "learning_rate": 5e-3}


@pytest.fixture(scope="module")
def train_events() -> list[dict]:
    return load_fertility_events("train")


@pytest.fixture(scope="module")
def trained(train_events):
    return fit_seed_net(train_events, feature_names=FEATURE_NAMES, **FAST)


def _event(entity: str, value: float, target: float | None = None, reset: bool = False) -> dict:
    event = {"entity": entity, "ts": 0, "features": [value], "reset": reset}
    if target is not None:
        event["target"] = target
    return event


def test_windows_stay_inside_segments():
    events = [_event("a", float(i), target=float(i + 1)) for i in range(5)]
    events += [_event("a", 10.0, target=11.0, reset=True), _event("a", 11.0, target=12.0)]
    events += [_event("b", 100.0 + i, target=None if i == 2 else 0.5) for i in range(3)]

    windows = build_windows(events, seq_len=2)

    assert windows.entities == ("a", "a", "a", "a", "a", "b")
    assert windows.inputs[:, :, 0].tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [10, 11], [100, 101]]
    assert windows.targets[:, 0].tolist() == [2, 3, 4, 5, 12, 0.5]


def test_windows_interleaved_entities():
    events = [_event("a", 1.0), _event("b", 5.0), _event("a", 2.0, target=3.0), _event("b", 6.0, target=7.0)]

    windows = build_windows(events, seq_len=2)

    assert windows.inputs[:, :, 0].tolist() == [[1, 2], [5, 6]]


def test_no_windows_rejected():
    with pytest.raises(ValueError, match="no training windows"):
        train_seed_net([_event("a", 1.0, target=2.0)], seq_len=3)


def test_loss_decreases(trained):
    losses = trained.epoch_losses

    assert len(losses) == FAST["epochs"]
    assert losses[-1] < 0.1 * losses[0]
    assert min(losses[-3:]) < 0.01


def test_manifest_scaling_fields(trained, train_events):
    manifest = trained.manifest
    rates = np.array([event["features"][0] for event in train_events])

    assert manifest.cell == "lstm"
    assert manifest.input_size == 2
    assert manifest.output_size == 1
    assert manifest.seq_len == FAST["seq_len"]
    assert manifest.feature_names == FEATURE_NAMES
    assert len(manifest.input_mean) == len(manifest.input_std) == 2
    assert len(manifest.output_mean) == len(manifest.output_std) == 1
    assert manifest.input_mean[0] == pytest.approx(rates.mean(), rel=0.05)
    assert manifest.input_std[0] == pytest.approx(rates.std(), rel=0.05)
    assert manifest.output_mean[0] == pytest.approx(rates.mean(), rel=0.05)


def test_state_dict_loads_into_seed_net(trained):
    manifest = trained.manifest
    net = SeedNet(manifest.input_size, manifest.hidden_size, manifest.seq_len, manifest.output_size,
                  manifest.num_layers)

    net.load_state_dict(trained.state_dict)

    assert set(trained.state_dict) == {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0",
                                       "lstm.bias_hh_l0", "fc.weight", "fc.bias"}


def test_training_deterministic(train_events):
    events = train_events[:3000]
    settings = FAST | {"epochs": 2}

    first, _ = train_seed_net(events, seed=3, **settings)
    second, _ = train_seed_net(events, seed=3, **settings)
    other, _ = train_seed_net(events, seed=4, **settings)

    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_training_restores_torch_settings(train_events):
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    train_seed_net(train_events[:2000], **(FAST | {"epochs": 1}))

    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(torch.rand(3), expected)


def test_holdout_beats_baselines(trained):
    holdout = load_fertility_events("holdout")

    metrics = evaluate_windows(trained.state_dict, trained.manifest, holdout, last_value_feature=0)

    assert metrics.windows > 1000
    assert metrics.mae < 0.1 * metrics.mean_mae
    assert metrics.mae < metrics.last_value_mae


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_other_cells_train(train_events, cell):
    state_dict, manifest = train_seed_net(train_events[:2000], cell=cell, **(FAST | {"epochs": 1}))

    assert manifest.cell == cell
    assert f"{cell}.weight_ih_l0" in state_dict


def test_vector_targets():
    rng = np.random.default_rng(0)
    events = [
        {"entity": f"e{i % 5}", "ts": i, "features": rng.standard_normal(3).tolist(), "target": [1.0, float(i)]}
        for i in range(200)
    ]

    _, manifest = train_seed_net(events, **(FAST | {"seq_len": 3, "epochs": 1}))

    assert manifest.output_size == 2
    assert manifest.output_std[0] == 1.0


def test_train_bundle_loads(tmp_path):
    path = tmp_path / "fertility.pt"

    result = train_bundle(path, **FAST)

    manifest, _ = read_model_file(path)
    model = load_model(path)
    assert manifest == result.training.manifest
    assert model.manifest.feature_names == FEATURE_NAMES
    assert result.holdout.last_value_mae is not None
    assert result.holdout.mae < result.holdout.last_value_mae
