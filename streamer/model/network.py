"""The served model: recurrent weights plus head, with a one-timestep step and a batched window forward."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from streamer.errors import ConfigError, ModelError
from streamer.model.loading import fingerprint, read_model_file
from streamer.model.manifest import ModelManifest

logger = logging.getLogger(__name__)

# Cells with state ``h`` only. LSTM layers run in ``_step_lstm`` instead of ``torch.lstm_cell``.
_CELL_FUNCTIONS = {"gru": torch.gru_cell, "rnn": torch.rnn_tanh_cell}
_MODULES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def resolve_device(name: str) -> torch.device:
    """Parse a torch device name and check that this machine has it; raise ConfigError otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"Invalid device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {name} requested, but torch finds no CUDA device here: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"Device {name} requested, but torch finds {torch.cuda.device_count()} CUDA devices")
    return device


class RecurrentModel:
    """Stateless model: all recurrent state is passed in and returned, never kept here.

    State tensors are slot-major, ``(N, num_layers, hidden_size)`` per state name (``h``, plus ``c`` for LSTM),
    which is the layout of the state arena's rows. Inputs are raw feature values; the manifest's input scaling
    and output inverse scaling are applied here.
    """

    def __init__(self, manifest: ModelManifest, weights: dict[str, torch.Tensor], device: str = "cpu") -> None:
        self.manifest = manifest
        self.fingerprint = fingerprint(manifest, weights)
        # A window length changes the state of window semantics only, so stateful state ignores it.
        self._stateful_fingerprint = fingerprint(dataclasses.replace(manifest, seq_len=None), weights)
        self.device = resolve_device(device)
        self.state_names: tuple[str, ...] = ("h", "c") if manifest.cell == "lstm" else ("h",)
        has_bias = "rnn.bias_ih_l0" in weights
        options = {"nonlinearity": "relu"} if manifest.nonlinearity == "relu" else {}
        self.rnn = _MODULES[manifest.cell](manifest.input_size, manifest.hidden_size, manifest.num_layers,
                                           bias=has_bias, batch_first=True, **options)
        self.head = nn.Linear(manifest.hidden_size, manifest.output_size, bias="head.bias" in weights)
        self.rnn.load_state_dict({key[len("rnn."):]: value for key, value in weights.items() if key.startswith("rnn.")})
        self.head.load_state_dict({key[len("head."):]: value for key, value in weights.items()
                                   if key.startswith("head.")})
        self.rnn.to(self.device).eval().requires_grad_(False)
        self.head.to(self.device).eval().requires_grad_(False)
        self._cell = torch.rnn_relu_cell if manifest.nonlinearity == "relu" else _CELL_FUNCTIONS.get(manifest.cell)
        self._layers = [
            tuple(getattr(self.rnn, f"{kind}_l{layer}") if has_bias or kind.startswith("weight") else None
                  for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            for layer in range(manifest.num_layers)
        ]
        self._fused_lstm = None
        if manifest.cell == "lstm":
            self._fused_lstm = [self._fuse_lstm_layer(*layer) for layer in self._layers]
        self._input_mean = self._vector(manifest.input_mean)
        self._input_std = self._vector(manifest.input_std)
        self._output_mean = self._vector(manifest.output_mean)
        self._output_std = self._vector(manifest.output_std)

    def _fuse_lstm_layer(self, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor | None,
                         b_hh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return one layer's weights as a single ``(input + hidden, 4 * hidden)`` matrix and one bias.

        PyTorch orders the gates input, forget, cell, output. They are reordered to input, forget, output, cell
        so that the three sigmoid gates form one contiguous block of columns.
        """
        hidden = self.manifest.hidden_size

        def reorder(tensor: torch.Tensor) -> torch.Tensor:
            i, f, g, o = tensor.split(hidden, 0)
            return torch.cat([i, f, o, g], 0)

        weight = torch.cat([reorder(w_ih), reorder(w_hh)], 1).t().contiguous()
        bias = torch.zeros(4 * hidden, device=weight.device)
        for b in (b_ih, b_hh):
            if b is not None:
                bias = bias + reorder(b)
        return weight, bias.contiguous()

    def _vector(self, values: tuple[float, ...] | None) -> torch.Tensor | None:
        return None if values is None else torch.tensor(values, dtype=torch.float32, device=self.device)

    @classmethod
    def load(cls, path: str | Path, *, seq_len: int | None = None, device: str = "cpu") -> RecurrentModel:
        """Load a bundle or a plain seed ``state_dict`` file; ``seq_len`` overrides the manifest's."""
        manifest, weights = read_model_file(path)
        if seq_len is not None and manifest.seq_len is not None and seq_len != manifest.seq_len:
            logger.warning("Window length %d (--seq-len) replaces the seq_len %d of the bundle %s, the window it "
                           "was trained on", seq_len, manifest.seq_len, path)
        return cls(manifest.with_seq_len(seq_len), weights, device=device)

    @property
    def state_shape(self) -> tuple[int, int]:
        return (self.manifest.num_layers, self.manifest.hidden_size)

    def scale_inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self._input_mean is not None:
            x = x - self._input_mean
        if self._input_std is not None:
            x = x / self._input_std
        return x

    def unscale_outputs(self, y: torch.Tensor) -> torch.Tensor:
        if self._output_std is not None:
            y = y * self._output_std
        if self._output_mean is not None:
            y = y + self._output_mean
        return y

    def step(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Advance N entities by one timestep.

        ``x`` is (N, input_size) raw features; ``state`` holds (N, num_layers, hidden_size) tensors in
        ``state_names`` order. Returns the new state in the same layout and the head's output (N, output_size)
        computed from the top layer's new ``h``.
        """
        layer_input = self.scale_inputs(x)
        if self._fused_lstm is not None:
            h, c = state
            return self._step_lstm(layer_input, h, c)
        new_h = []
        for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(self._layers):
            layer_input = self._cell(layer_input, state[0][:, layer], w_ih, w_hh, b_ih, b_hh)
            new_h.append(layer_input)
        return (torch.stack(new_h, 1),), self.unscale_outputs(self.head(layer_input))

    def _step_lstm(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
                   ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Advance an LSTM with one matrix product per layer, writing the new state into its final layout.

        The elementwise gate functions run in place on the product, which takes fewer and cheaper tensor
        operations than ``torch.lstm_cell``.
        """
        hidden = self.manifest.hidden_size
        new_h = torch.empty_like(h)
        new_c = torch.empty_like(c)
        # unbind and split return all views in one call each, which costs less than per-layer indexing.
        h_in, c_in, h_out, c_out = h.unbind(1), c.unbind(1), new_h.unbind(1), new_c.unbind(1)
        layer_input = x
        for layer, (weight, bias) in enumerate(self._fused_lstm):
            gates = torch.addmm(bias, torch.cat([layer_input, h_in[layer]], 1), weight)
            # split_with_sizes and chunk are C methods, while Tensor.split is a Python wrapper around them.
            sigmoid_gates, cell_gate = gates.split_with_sizes([3 * hidden, hidden], 1)
            sigmoid_gates.sigmoid_()
            cell_gate.tanh_()
            input_gate, forget_gate, output_gate = sigmoid_gates.chunk(3, 1)
            torch.mul(forget_gate, c_in[layer], out=c_out[layer])
            c_out[layer].addcmul_(input_gate, cell_gate)
            torch.tanh(c_out[layer], out=h_out[layer])
            h_out[layer].mul_(output_gate)
            layer_input = h_out[layer]
        head = self.head
        return (new_h, new_c), self.unscale_outputs(F.linear(layer_input, head.weight, head.bias))

    def forward_windows(self, windows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Run each window from zero state and return the head's output at its last valid timestep.

        ``windows`` is (N, T, input_size), right-padded where ``lengths`` (N,) is below T. A recurrent layer is
        causal, so the output at timestep ``lengths - 1`` does not depend on the padding after it.
        """
        if windows.shape[0] == 0:
            return torch.empty(0, self.manifest.output_size, device=self.device)
        output, _ = self.rnn(self.scale_inputs(windows))
        rows = torch.arange(windows.shape[0], device=windows.device)
        return self.unscale_outputs(self.head(output[rows, lengths - 1]))

    def state_fingerprint(self, semantics: str) -> str:
        """Return the fingerprint that state records of ``semantics`` carry, to be restored only by this model.

        It is ``fingerprint`` in window semantics. In stateful semantics it leaves out ``seq_len``, which does
        not change a stateful entity's state, so a ``--seq-len`` given or dropped keeps the state usable.
        """
        return self.fingerprint if semantics == "window" else self._stateful_fingerprint

    def zero_state(self, n: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(n, *self.state_shape, device=self.device) for _ in self.state_names)

    def check_input_size(self, size: int) -> None:
        if size != self.manifest.input_size:
            raise ModelError(f"Invalid input: the model takes {self.manifest.input_size} features, got {size}")
