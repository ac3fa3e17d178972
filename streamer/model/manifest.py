"""The model manifest: what a set of recurrent weights is and how its inputs and outputs are scaled."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from streamer.errors import ModelError

CELLS = ("lstm", "gru", "rnn")
# Rows of weight_ih per hidden unit: LSTM has 4 gates (i, f, g, o), GRU 3 (r, z, n), a tanh RNN 1.
GATES_PER_CELL = {"lstm": 4, "gru": 3, "rnn": 1}


@dataclass(frozen=True)
class ModelManifest:
    """Shape and scaling of a recurrent model with a linear head on the top layer's output.

    Inputs are scaled as ``(x - input_mean) / input_std`` before the model, and the head's output is mapped
    back as ``y * output_std + output_mean``. ``seq_len`` is the window length of ``window`` semantics.
    """

    cell: str
    input_size: int
    hidden_size: int
    num_layers: int
    output_size: int
    feature_names: tuple[str, ...] | None = None
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None
    output_mean: tuple[float, ...] | None = None
    output_std: tuple[float, ...] | None = None
    seq_len: int | None = None
    # The activation of an RNN cell, which its weights do not show: None (tanh, PyTorch's default) or "relu".
    nonlinearity: str | None = None

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ModelError(f"Invalid cell type {self.cell!r}: expected one of {', '.join(CELLS)}")
        if self.nonlinearity == "tanh":
            object.__setattr__(self, "nonlinearity", None)  # the default, so that fingerprints do not change
        if self.nonlinearity not in (None, "relu"):
            raise ModelError(f"Invalid manifest field nonlinearity={self.nonlinearity!r}: expected tanh or relu")
        if self.nonlinearity == "relu" and self.cell != "rnn":
            raise ModelError(f"Invalid manifest field nonlinearity='relu' for a {self.cell.upper()} cell: only an "
                             "RNN cell has a choice of activation")
        for name in ("input_size", "hidden_size", "num_layers", "output_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelError(f"Invalid manifest field {name}={value!r}: expected a positive integer")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 1):
            raise ModelError(f"Invalid manifest field seq_len={self.seq_len!r}: expected a positive integer")
        if self.feature_names is not None:
            if isinstance(self.feature_names, (str, bytes)) or not all(
                    isinstance(name, str) and name for name in self.feature_names):
                raise ModelError(f"Invalid feature_names {self.feature_names!r}: expected a list of non-empty "
                                 "strings, one per input")
            object.__setattr__(self, "feature_names", tuple(self.feature_names))
            names = list(self.feature_names)
            if len(set(names)) != len(names):
                raise ModelError(f"Invalid feature_names {names}: the names must be distinct")
            if len(names) != self.input_size:
                raise ModelError(f"Inconsistent manifest: feature_names {names} has {len(names)} entries, but "
                                 f"input_size is {self.input_size}; one of the two is wrong")
        self._check_scaling("input_mean", self.input_size)
        self._check_scaling("input_std", self.input_size, positive=True)
        self._check_scaling("output_mean", self.output_size)
        self._check_scaling("output_std", self.output_size, positive=True)

    def _check_scaling(self, name: str, size: int, positive: bool = False) -> None:
        values = getattr(self, name)
        if values is None:
            return
        values = tuple(float(v) for v in values)
        object.__setattr__(self, name, values)
        if len(values) != size:
            raise ModelError(f"Invalid manifest field {name}: expected {size} values, found {len(values)}")
        if not all(math.isfinite(v) for v in values) or (positive and min(values) <= 0):
            kind = "positive finite" if positive else "finite"
            raise ModelError(f"Invalid manifest field {name}={list(values)}: expected {kind} numbers")

    def with_seq_len(self, seq_len: int | None) -> ModelManifest:
        """Return a copy with ``seq_len`` replaced, or this manifest when ``seq_len`` is None."""
        return self if seq_len is None else dataclasses.replace(self, seq_len=seq_len)

    def describe(self) -> str:
        """Return the cell, sizes and feature names in one line, for logs."""
        names = f" ({', '.join(self.feature_names)})" if self.feature_names else ""
        plural = "s" if self.output_size != 1 else ""
        cell = self.cell if self.nonlinearity is None else f"{self.cell} ({self.nonlinearity})"
        return (f"{cell} with {self.input_size} inputs{names}, hidden size {self.hidden_size}, "
                f"{self.num_layers} layers, {self.output_size} output{plural}")

    def to_dict(self) -> dict[str, Any]:
        return {
            field.name: (list(value) if isinstance(value, tuple) else value)
            for field in dataclasses.fields(self)
            if (value := getattr(self, field.name)) is not None
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelManifest:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"Unexpected manifest fields {unknown}: expected only {sorted(known)}")
        missing = sorted(name for name in ("cell", "input_size", "hidden_size", "num_layers", "output_size")
                         if name not in data)
        if missing:
            raise ModelError(f"Missing manifest fields {missing}")
        return cls(**data)
