"""Bundles of users' own models: `streamer bundle`, RNN activations and recurrent modules named ``rnn``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from streamer.engine import Engine, EventBatch
from streamer.errors import ModelError
from streamer.model import ModelManifest, load_model, save_bundle


class Net(nn.Module):
    """A user's model: the recurrent module is named ``rnn`` whatever its cell."""

    def __init__(self, module: nn.Module, hidden: int, outputs: int = 1) -> None:
        super().__init__()
        self.rnn = module
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def stateful_outputs(path, sequence: np.ndarray) -> np.ndarray:
    engine = Engine(load_model(path))
    return np.concatenate([engine.process(EventBatch.build(["a"], row[None, :], offsets=[k])).predictions
                           for k, row in enumerate(sequence)])


@pytest.mark.parametrize("module", [nn.LSTM(3, 8, 2, batch_first=True), nn.GRU(3, 8, 1, batch_first=True),
                                    nn.RNN(3, 8, 2, batch_first=True)], ids=["lstm", "gru", "rnn"])
def test_module_named_rnn_loads_by_its_shape(tmp_path, module):
    torch.manual_seed(0)
    net = Net(module, 8).eval()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    sequence = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)

    outputs = stateful_outputs(tmp_path / "net.pt", sequence)

    with torch.no_grad():
        expected = [net(torch.from_numpy(sequence[None, :k])).numpy()[0] for k in range(1, 7)]
    np.testing.assert_allclose(outputs, np.array(expected), atol=1e-5)


def test_bundle_command_sets_relu_and_scaling(tmp_path):
    torch.manual_seed(1)
    net = Net(nn.RNN(2, 6, 2, nonlinearity="relu", batch_first=True), 6).eval()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    completed = subprocess.run(
        [sys.executable, "-m", "streamer", "bundle", "--model", str(tmp_path / "net.pt"), "--output",
         str(tmp_path / "net.bundle.pt"), "--feature-names", "temp,load", "--input-mean", "20,0.5",
         "--input-std", "4,0.1", "--output-mean", "3", "--output-std", "2", "--nonlinearity", "relu",
         "--seq-len", "5"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "rnn (relu) with 2 inputs (temp, load), hidden size 6, 2 layers, 1 output;" in completed.stdout
    raw = np.random.default_rng(1).normal([20, 0.5], [4, 0.1], size=(5, 2)).astype(np.float32)

    outputs = stateful_outputs(tmp_path / "net.bundle.pt", raw)

    scaled = (raw - np.array([20, 0.5], np.float32)) / np.array([4, 0.1], np.float32)
    with torch.no_grad():
        expected = [net(torch.from_numpy(scaled[None, :k])).numpy()[0] * 2 + 3 for k in range(1, 6)]
    np.testing.assert_allclose(outputs, np.array(expected), atol=1e-4)
    manifest = load_model(tmp_path / "net.bundle.pt").manifest
    assert (manifest.nonlinearity, manifest.feature_names, manifest.seq_len) == ("relu", ("temp", "load"), 5)


def test_bundle_command_rejects_scaling_of_another_size(tmp_path):
    torch.save(Net(nn.LSTM(2, 4, 1, batch_first=True), 4).state_dict(), tmp_path / "net.pt")
    completed = subprocess.run(
        [sys.executable, "-m", "streamer", "bundle", "--model", str(tmp_path / "net.pt"), "--output",
         str(tmp_path / "out.pt"), "--input-mean", "1,2,3"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "input_mean: expected 2 values, found 3" in completed.stderr
    assert not (tmp_path / "out.pt").exists()


def test_bundle_rejects_output_same_as_model(tmp_path):
    torch.save(Net(nn.LSTM(2, 4, 1, batch_first=True), 4).state_dict(), tmp_path / "net.pt")
    before = (tmp_path / "net.pt").read_bytes()
    completed = subprocess.run(
        [sys.executable, "-m", "streamer", "bundle", "--model", str(tmp_path / "net.pt"), "--output",
         str(tmp_path / "." / "net.pt"), "--seq-len", "5"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr
    assert "it is the model file being read; choose another --output" in completed.stderr
    assert (tmp_path / "net.pt").read_bytes() == before


def test_failed_write_keeps_earlier_bundle(tmp_path, monkeypatch):
    net = Net(nn.LSTM(2, 4, 1, batch_first=True), 4)
    manifest = ModelManifest("lstm", 2, 4, 1, 1)
    save_bundle(tmp_path / "b.pt", net.state_dict(), manifest)
    before = (tmp_path / "b.pt").read_bytes()

    def interrupted_save(payload, path):
        with open(path, "wb") as file:
            file.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(OSError, match="No space left"):
        save_bundle(tmp_path / "b.pt", net.state_dict(), dataclasses.replace(manifest, seq_len=4))

    assert (tmp_path / "b.pt").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["b.pt"]


def test_manifest_nonlinearity():
    base = dict(input_size=2, hidden_size=4, num_layers=1, output_size=1)
    assert ModelManifest("rnn", nonlinearity="tanh", **base) == ModelManifest("rnn", **base)
    with pytest.raises(ModelError, match="only an RNN cell"):
        ModelManifest("lstm", nonlinearity="relu", **base)


def test_training_checkpoint_names_its_state_dict(tmp_path):
    net = Net(nn.LSTM(2, 4, 1, batch_first=True), 4)
    torch.save({"epoch": 3, "model_state_dict": net.state_dict(), "loss": 0.1}, tmp_path / "checkpoint.pt")

    with pytest.raises(ModelError, match=r"torch.save\(checkpoint\['model_state_dict'\], path\)"):
        load_model(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("names", ["ab", [1, 2], ["a", ""]])
def test_feature_names_must_be_strings(names):
    with pytest.raises(ModelError, match="expected a list of non-empty strings"):
        ModelManifest("lstm", input_size=2, hidden_size=4, num_layers=1, output_size=1, feature_names=names)
