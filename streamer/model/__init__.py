"""Model manifests, loading of seed ``state_dict`` files and bundles, and the stateless step functions."""

from streamer.model.loading import fingerprint, parse_state_dict, read_model_file, save_bundle
from streamer.model.manifest import CELLS, ModelManifest
from streamer.model.network import RecurrentModel
from streamer.model.seed import SeedNet


def load_model(path, *, seq_len=None, device="cpu") -> RecurrentModel:
    """Load a bundle or a plain seed ``state_dict`` file as a servable model."""
    return RecurrentModel.load(path, seq_len=seq_len, device=device)


__all__ = [
    "CELLS",
    "ModelManifest",
    "RecurrentModel",
    "SeedNet",
    "fingerprint",
    "load_model",
    "parse_state_dict",
    "read_model_file",
    "save_bundle",
]
