"""The served model: one-timestep LSTM stepping against torch.nn.LSTM, and state fingerprints."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from streamer.model import RecurrentModel, parse_state_dict


def seed_style_state_dict(input_size: int, hidden: int, layers: int, bias: bool) -> dict[str, torch.Tensor]:
    rnn = nn.LSTM(input_size, hidden, layers, bias=bias, batch_first=True)
    head = nn.Linear(hidden, 2)
    return {**{f"lstm.{key}": value for key, value in rnn.state_dict().items()},
            **{f"fc.{key}": value for key, value in head.state_dict().items()}}


@pytest.mark.parametrize("input_size,hidden,layers,bias", [(3, 5, 1, True), (8, 64, 2, True), (4, 7, 3, False)])
def test_lstm_step_matches_nn_lstm(input_size, hidden, layers, bias):
    torch.manual_seed(layers)
    model = RecurrentModel(*parse_state_dict(seed_style_state_dict(input_size, hidden, layers, bias)))
    batch = 33
    x = torch.randn(batch, input_size)
    h = torch.randn(batch, layers, hidden)
    c = torch.randn(batch, layers, hidden)

    with torch.inference_mode():
        (new_h, new_c), y = model.step(x, (h, c))
        expected_out, (expected_h, expected_c) = model.rnn(x[:, None, :], (h.transpose(0, 1).contiguous(),
                                                                          c.transpose(0, 1).contiguous()))
        expected_y = model.head(expected_out[:, -1])

    assert torch.allclose(new_h, expected_h.transpose(0, 1), atol=1e-6)
    assert torch.allclose(new_c, expected_c.transpose(0, 1), atol=1e-6)
    assert torch.allclose(y, expected_y, atol=1e-6)


def test_state_fingerprint_ignores_window_length_in_stateful_semantics():
    torch.manual_seed(0)
    lstm, head = nn.LSTM(3, 8, 2, batch_first=True), nn.Linear(8, 1)
    state_dict = {**{f"lstm.{k}": v for k, v in lstm.state_dict().items()},
                  **{f"fc.{k}": v for k, v in head.state_dict().items()}}
    manifest, weights = parse_state_dict(state_dict)
    plain = RecurrentModel(manifest, weights)
    windowed = RecurrentModel(dataclasses.replace(manifest, seq_len=20), weights)
    other_window = RecurrentModel(dataclasses.replace(manifest, seq_len=30), weights)

    assert plain.fingerprint != windowed.fingerprint
    assert plain.state_fingerprint("stateful") == windowed.state_fingerprint("stateful") == plain.fingerprint
    assert windowed.state_fingerprint("window") == windowed.fingerprint
    assert windowed.state_fingerprint("window") != other_window.state_fingerprint("window")
