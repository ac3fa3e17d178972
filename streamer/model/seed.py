"""The reference network users train: a recurrent layer stack plus a linear head on the last timestep."""

from __future__ import annotations

import torch
from torch import nn

from streamer.model.manifest import ModelManifest

_RECURRENT_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class SeedNet(nn.Module):
    """``nn.LSTM`` (or ``nn.GRU``, tanh ``nn.RNN``) with ``batch_first=True`` and a linear head.

    ``forward`` runs a whole window from zero state and applies the head to the top layer's output at the
    last timestep, exactly as the models streamer serves were trained. Its ``state_dict`` keys are
    ``<cell>.weight_ih_l{k}``, ``<cell>.weight_hh_l{k}``, ``<cell>.bias_ih_l{k}``, ``<cell>.bias_hh_l{k}``,
    ``fc.weight`` and ``fc.bias``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, seq_len: int, output_dim: int, layers: int,
                 cell: str = "lstm") -> None:
        super().__init__()
        self.cell = cell
        self.seq_len = seq_len
        recurrent = _RECURRENT_CLASSES[cell](
            input_size=input_dim, hidden_size=hidden_dim, num_layers=layers, batch_first=True
        )
        setattr(self, cell, recurrent)
        self.fc = nn.Linear(hidden_dim, output_dim, bias=True)

    @property
    def recurrent(self) -> nn.RNNBase:
        return getattr(self, self.cell)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x`` of shape (N, T, input_dim) to (N, output_dim) from zero initial state."""
        output, _ = self.recurrent(x)
        return self.fc(output[:, -1])

    @classmethod
    def from_manifest(cls, manifest: ModelManifest) -> SeedNet:
        return cls(manifest.input_size, manifest.hidden_size, manifest.seq_len or 1, manifest.output_size,
                   manifest.num_layers, cell=manifest.cell)
