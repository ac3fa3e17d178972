"""Loading model files: a plain ``state_dict`` of the seed network, or a bundle with its manifest."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import orjson
import torch

from streamer.errors import ModelError
from streamer.model.manifest import CELLS, GATES_PER_CELL, ModelManifest

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "streamer.bundle"
BUNDLE_VERSION = 1

_RECURRENT_KEY = re.compile(
    r"^(?:(?P<prefix>.+)\.)?(?P<kind>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(?P<layer>\d+)(?P<reverse>_reverse)?$"
)
_RECURRENT_KINDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _check_tensors(state_dict: Mapping[str, Any]) -> None:
    if not state_dict:
        raise ModelError("Invalid model file: the state_dict is empty")
    # A training checkpoint ({"epoch": ..., "model_state_dict": {...}}) is named for its nested state_dict,
    # wherever that sits among the entries.
    nested = next((key for key, value in state_dict.items() if isinstance(value, Mapping)), None)
    if nested is not None:
        raise ModelError(f"Invalid state_dict entry {nested!r}: expected a tensor, found a mapping; a training "
                         f"checkpoint that holds the state_dict under {nested!r} can be served after saving that "
                         f"entry alone: torch.save(checkpoint[{nested!r}], path)")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"Invalid state_dict entry {key!r}: expected a tensor, found {type(value).__name__}")
        if not value.is_floating_point():
            raise ModelError(f"Invalid state_dict entry {key!r}: expected floating-point weights, found {value.dtype}")
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            raise ModelError(f"Invalid state_dict entry {key!r}: {value.numel() - int(finite.sum())} of "
                             f"{value.numel()} weights are NaN or infinite")


def _split_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict[tuple[str, int], torch.Tensor], list[str]]:
    """Separate the recurrent keys from the rest; return (recurrent prefix, {(kind, layer): tensor}, others)."""
    recurrent: dict[tuple[str, int], torch.Tensor] = {}
    prefixes: set[str] = set()
    others: list[str] = []
    for key, tensor in state_dict.items():
        match = _RECURRENT_KEY.match(key)
        if match is None:
            others.append(key)
            continue
        if match["reverse"]:
            raise ModelError(
                f"Unsupported key {key!r}: bidirectional weights need the future of the sequence and cannot be "
                "streamed causally; train with bidirectional=False"
            )
        if match["kind"] == "weight_hr":
            raise ModelError(f"Unsupported key {key!r}: LSTM projections (proj_size > 0) are not supported")
        prefixes.add(match["prefix"] or "")
        recurrent[(match["kind"], int(match["layer"]))] = tensor
    if not recurrent:
        raise ModelError(
            f"Missing recurrent weights: expected keys like 'lstm.weight_ih_l0', found {sorted(state_dict)}"
        )
    if len(prefixes) > 1:
        raise ModelError(f"Unexpected keys: found recurrent weights under several prefixes {sorted(prefixes)}")
    return prefixes.pop(), recurrent, others


def _infer_cell(prefix: str, rows: int, hidden_size: int) -> str:
    gates, remainder = divmod(rows, hidden_size)
    by_shape = next((cell for cell, count in GATES_PER_CELL.items() if count == gates and not remainder), None)
    name = prefix.rsplit(".", 1)[-1].lower()
    # The shape decides: a module keeps its attribute name when a model swaps nn.LSTM for nn.GRU, and "rnn"
    # names any recurrent module as often as nn.RNN.
    if name in CELLS and name != "rnn" and by_shape is not None and by_shape != name:
        logger.warning("Weights named %s have the shape of a %s (%d rows of weight_hh_l0 for hidden size %d): "
                       "loading them as a %s", prefix, by_shape.upper(), rows, hidden_size, by_shape.upper())
    if by_shape is None:
        raise ModelError(
            f"Cannot infer the cell type of {prefix or 'the'} weights: weight_hh_l0 has {rows} rows for hidden size "
            f"{hidden_size}; expected 4x (LSTM), 3x (GRU) or 1x (RNN)"
        )
    return by_shape


def _expect_shape(key: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ModelError(f"Inconsistent shape for {key!r}: expected {list(expected)}, found {list(tensor.shape)}")


def parse_state_dict(state_dict: Mapping[str, Any]) -> tuple[ModelManifest, dict[str, torch.Tensor]]:
    """Infer the manifest of a seed-style ``state_dict`` and return it with the weights under canonical names.

    Canonical names are ``rnn.weight_ih_l{k}`` ... and ``head.weight``/``head.bias``. Every shape is checked;
    missing, unexpected and inconsistent keys raise ``ModelError`` naming the key.
    """
    _check_tensors(state_dict)
    prefix, recurrent, others = _split_keys(state_dict)
    dotted = f"{prefix}." if prefix else ""
    if ("weight_hh", 0) not in recurrent or ("weight_ih", 0) not in recurrent:
        raise ModelError(f"Missing key {dotted}weight_ih_l0 or {dotted}weight_hh_l0")
    rows, hidden_size = recurrent[("weight_hh", 0)].shape if recurrent[("weight_hh", 0)].dim() == 2 else (0, 0)
    if hidden_size == 0:
        raise ModelError(f"Inconsistent shape for {dotted}weight_hh_l0: expected a matrix, "
                         f"found {list(recurrent[('weight_hh', 0)].shape)}")
    cell = _infer_cell(prefix, rows, hidden_size)
    gate_rows = GATES_PER_CELL[cell] * hidden_size
    num_layers = 1 + max(layer for _, layer in recurrent)
    has_bias = ("bias_ih", 0) in recurrent or ("bias_hh", 0) in recurrent
    input_size = recurrent[("weight_ih", 0)].shape[-1]

    weights: dict[str, torch.Tensor] = {}
    for layer in range(num_layers):
        for kind in _RECURRENT_KINDS:
            key = f"{dotted}{kind}_l{layer}"
            if kind.startswith("bias") and not has_bias:
                if (kind, layer) in recurrent:
                    raise ModelError(f"Unexpected key {key!r}: layer 0 has no biases")
                continue
            if (kind, layer) not in recurrent:
                raise ModelError(f"Missing key {key!r} for layer {layer} of {num_layers}")
            columns = input_size if (kind == "weight_ih" and layer == 0) else hidden_size
            expected = (gate_rows, columns) if kind.startswith("weight") else (gate_rows,)
            _expect_shape(key, recurrent[(kind, layer)], expected)
            weights[f"rnn.{kind}_l{layer}"] = recurrent[(kind, layer)]

    head_weights = [key for key in others if key.endswith(".weight") or key == "weight"]
    if len(head_weights) != 1:
        raise ModelError(
            f"Missing or ambiguous head: expected one linear layer such as 'fc.weight' and 'fc.bias', found {others}"
        )
    head = head_weights[0][: -len("weight")]
    unexpected = sorted(set(others) - {f"{head}weight", f"{head}bias"})
    if unexpected:
        raise ModelError(f"Unexpected keys {unexpected}: expected only the recurrent layers and one linear head")
    head_weight = state_dict[f"{head}weight"]
    if head_weight.dim() != 2:
        raise ModelError(f"Inconsistent shape for {head}weight: expected [output_size, {hidden_size}], "
                         f"found {list(head_weight.shape)}")
    output_size = head_weight.shape[0]
    _expect_shape(f"{head}weight", head_weight, (output_size, hidden_size))
    weights["head.weight"] = head_weight
    if f"{head}bias" in state_dict:
        _expect_shape(f"{head}bias", state_dict[f"{head}bias"], (output_size,))
        weights["head.bias"] = state_dict[f"{head}bias"]

    manifest = ModelManifest(cell=cell, input_size=input_size, hidden_size=hidden_size, num_layers=num_layers,
                             output_size=output_size)
    return manifest, {key: value.detach().to(torch.float32).contiguous() for key, value in weights.items()}


def fingerprint(manifest: ModelManifest, weights: Mapping[str, torch.Tensor]) -> str:
    """Hash the manifest and every weight's name, shape and bytes into 16 hex digits."""
    digest = hashlib.sha256(orjson.dumps(manifest.to_dict(), option=orjson.OPT_SORT_KEYS))
    for key in sorted(weights):
        tensor = weights[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(key.encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_bundle(path: str | Path, state_dict: Mapping[str, torch.Tensor], manifest: ModelManifest) -> None:
    """Write the weights and manifest as one torch file; the weights must match the manifest's shape."""
    inferred, weights = parse_state_dict(state_dict)
    _check_matches(inferred, manifest)
    # Stored under the seed's names (<cell>.weight_ih_l0, fc.weight), so the cell name stays unambiguous.
    seed_names = {key.replace("rnn.", f"{manifest.cell}.", 1).replace("head.", "fc.", 1): value
                  for key, value in weights.items()}
    payload = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "manifest": manifest.to_dict(),
               "state_dict": seed_names}
    # Written beside the target and renamed over it, so an interrupted write never leaves half a bundle.
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        torch.save(payload, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _check_matches(inferred: ModelManifest, manifest: ModelManifest) -> None:
    for name in ("cell", "input_size", "hidden_size", "num_layers", "output_size"):
        if getattr(inferred, name) != getattr(manifest, name):
            raise ModelError(
                f"Manifest does not match the weights: {name} is {getattr(manifest, name)!r} in the manifest, "
                f"{getattr(inferred, name)!r} in the weights"
            )


def read_model_file(path: str | Path) -> tuple[ModelManifest, dict[str, torch.Tensor]]:
    """Read a bundle or a plain ``state_dict`` file and return its manifest and canonical weights."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"Invalid model file {path}: it is a directory; expected a state_dict or bundle file")
    if not path.is_file():
        raise ModelError(f"Model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for corrupt or foreign files
        expected = "expected a state_dict saved with torch.save(net.state_dict(), path) or a streamer bundle"
        # torch.save writes a zip archive. torch's own message for a weights-only failure suggests
        # weights_only=False, which would run code from the file, so it is replaced.
        if path.stat().st_size == 0:
            reason = "the file is empty"
        elif not zipfile.is_zipfile(path):
            with path.open("rb") as file:
                zip_start = file.read(4) == b"PK\x03\x04"
            reason = ("a zip archive without its end, as a truncated copy or an unfinished download is" if zip_start
                      else "not a file written by torch.save (not a zip archive)")
        elif isinstance(error, pickle.UnpicklingError):
            reason = ("it contains Python objects, not only tensors (a whole module saved with torch.save(net) "
                      "is one)")
        else:
            detail = (str(error).strip().splitlines() or [""])[0][:200]
            reason = f"torch.load failed ({type(error).__name__}: {detail})"
        raise ModelError(f"Invalid model file {path}: {reason}; {expected}") from error
    if not isinstance(payload, Mapping):
        raise ModelError(f"Invalid model file {path}: expected a state_dict or a bundle, found {type(payload).__name__}")
    if payload.get("format") == BUNDLE_FORMAT:
        if payload.get("version") != BUNDLE_VERSION:
            raise ModelError(f"Unsupported bundle version {payload.get('version')!r} in {path}: "
                             f"expected {BUNDLE_VERSION}")
        for key in ("manifest", "state_dict"):
            if not isinstance(payload.get(key), Mapping):
                raise ModelError(f"Invalid bundle {path}: {key!r} is missing or not a mapping")
        manifest = ModelManifest.from_dict(dict(payload["manifest"]))
        inferred, weights = parse_state_dict(payload["state_dict"])
        _check_matches(inferred, manifest)
        return manifest, weights
    return parse_state_dict(payload)
