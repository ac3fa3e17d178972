"""Bundles from users' model files: the weights plus a manifest of feature names, scaling and window length."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from streamer.errors import ConfigError
from streamer.model.loading import fingerprint, read_model_file, save_bundle
from streamer.model.manifest import ModelManifest


def write_bundle(model_path: str | Path, output: str | Path, *, feature_names: Sequence[str] | None = None,
                 input_mean: Sequence[float] | None = None, input_std: Sequence[float] | None = None,
                 output_mean: Sequence[float] | None = None, output_std: Sequence[float] | None = None,
                 seq_len: int | None = None, nonlinearity: str | None = None) -> tuple[ModelManifest, str]:
    """Write ``model_path``'s weights to ``output`` as a bundle and return its manifest and fingerprint.

    Sizes and cell type come from the weights. A field left as None keeps the value of a bundle given as
    ``model_path`` (none for a plain state_dict). The manifest checks every value against the sizes.
    """
    output = Path(output)
    if output.exists() and Path(model_path).exists() and output.samefile(model_path):
        raise ConfigError(f"Cannot write {output}: it is the model file being read; choose another --output")
    manifest, weights = read_model_file(model_path)
    fields = {"feature_names": feature_names, "input_mean": input_mean, "input_std": input_std,
             "output_mean": output_mean, "output_std": output_std, "seq_len": seq_len,
             "nonlinearity": nonlinearity}
    manifest = dataclasses.replace(manifest, **{name: value for name, value in fields.items() if value is not None})
    # save_bundle takes the seed's key names (<cell>.weight_ih_l0, fc.weight), as users' files have them.
    seed_names = {key.replace("rnn.", f"{manifest.cell}.", 1).replace("head.", "fc.", 1): value
                  for key, value in weights.items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    save_bundle(output, seed_names, manifest)
    return manifest, fingerprint(manifest, weights)
