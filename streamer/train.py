"""Training of the seed network on event streams, the way the models streamer serves are trained.

Each training example is a window of ``seq_len`` consecutive events of one entity inside one segment (a
segment ends where an event has ``reset: true``), labelled with the target of the window's last event.
The network runs every window from zero state and is fitted with Adam on the mean squared error of
standardized targets. Inputs are standardized with the mean and standard deviation of all training
events' features, and targets with those of the training windows' targets. Both go into the manifest, so
the engine applies the same scaling to raw features and maps outputs back to target units.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from streamer.errors import ConfigError
from streamer.model import ModelManifest, SeedNet, save_bundle

logger = logging.getLogger(__name__)

# A feature or target with a standard deviation below this is treated as constant and gets std 1.0, so
# scaling only centers it instead of dividing by zero.
_MIN_STD = 1e-8


@dataclass(frozen=True)
class WindowSet:
    """Training windows in raw (unscaled) units.

    ``inputs`` has shape (N, seq_len, input_size) and ``targets`` (N, output_size). ``entities`` names the
    entity of each window.
    """

    inputs: np.ndarray
    targets: np.ndarray
    entities: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class TrainingResult:
    """A trained seed network with its manifest and the mean training loss of each epoch.

    Losses are the mean squared error on standardized targets, averaged over the epoch's windows.
    """

    state_dict: dict[str, torch.Tensor]
    manifest: ModelManifest
    epoch_losses: tuple[float, ...]
    train_windows: int
    seconds: float


@dataclass(frozen=True)
class WindowMetrics:
    """Accuracy of a model on windows, next to two baselines, in target units.

    ``mean_mae`` predicts the training target mean (the manifest's ``output_mean``) for every window.
    ``last_value_mae`` predicts one input feature of the window's last event, and is None when no feature
    was named as the last-value baseline.
    """

    windows: int
    mae: float
    rmse: float
    mean_mae: float
    last_value_mae: float | None


def _target_vector(event: dict, index: int) -> list[float] | None:
    target = event.get("target")
    if target is None:
        return None
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        return [float(target)]
    if isinstance(target, (list, tuple)) and target:
        return [float(value) for value in target]
    raise ConfigError(
        f"event {index} of entity {event.get('entity')!r} has an invalid target {target!r}: "
        "expected a number or a non-empty list of numbers"
    )


def build_windows(events: Iterable[dict], seq_len: int) -> WindowSet:
    """Cut events into windows of ``seq_len`` consecutive events per entity and segment.

    Events are grouped by entity in input order. A window ends at every event that has a target and is
    preceded by at least ``seq_len - 1`` events of the same segment. Events without a target still fill
    windows as inputs.
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")

    segments: dict[str, list[tuple[list[float], list[float] | None]]] = defaultdict(list)
    finished: list[tuple[str, list[tuple[list[float], list[float] | None]]]] = []
    for index, event in enumerate(events):
        entity = str(event["entity"])
        if event.get("reset") and segments[entity]:
            finished.append((entity, segments.pop(entity)))
        segments[entity].append(([float(value) for value in event["features"]], _target_vector(event, index)))
    finished.extend(segments.items())

    inputs: list[list[list[float]]] = []
    targets: list[list[float]] = []
    entities: list[str] = []
    for entity, segment in finished:
        for end in range(seq_len - 1, len(segment)):
            target = segment[end][1]
            if target is None:
                continue
            inputs.append([features for features, _ in segment[end - seq_len + 1 : end + 1]])
            targets.append(target)
            entities.append(entity)

    if not targets:
        return WindowSet(np.zeros((0, seq_len, 0)), np.zeros((0, 0)), ())
    widths = {len(window[0]) for window in inputs} | {len(features) for window in inputs for features in window}
    target_widths = {len(target) for target in targets}
    if len(widths) != 1 or len(target_widths) != 1:
        raise ConfigError(
            f"events have feature counts {sorted(widths)} and target sizes {sorted(target_widths)}: "
            "expected one feature count and one target size"
        )
    return WindowSet(np.asarray(inputs, dtype="float64"), np.asarray(targets, dtype="float64"), tuple(entities))


def _mean_std(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = values.mean(axis=0)
    std = values.std(axis=0)
    return mean, np.where(std < _MIN_STD, 1.0, std)


def fit_seed_net(
    events: Iterable[dict],
    *,
    seq_len: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    epochs: int = 30,
    learning_rate: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    cell: str = "lstm",
    feature_names: Sequence[str] | None = None,
) -> TrainingResult:
    """Train a seed network on ``events`` and return it with its manifest and loss curve.

    Training is deterministic for a given seed and torch build: it runs on one CPU thread with
    ``torch.use_deterministic_algorithms(True)``, and it restores the caller's thread count,
    determinism flag and global random state afterwards.
    """
    if epochs < 1 or batch_size < 1 or learning_rate <= 0:
        raise ConfigError(
            f"invalid training settings epochs={epochs}, batch_size={batch_size}, learning_rate={learning_rate}: "
            "expected positive values"
        )
    events = list(events)
    windows = build_windows(events, seq_len)
    if len(windows) == 0:
        raise ConfigError(
            f"no training windows: expected at least one entity with {seq_len} consecutive events in one "
            "segment, the last of them with a target; pass more events or a smaller seq_len"
        )
    input_size = windows.inputs.shape[2]
    output_size = windows.targets.shape[1]
    # Input scaling uses every event once, while target scaling uses the targets of the training windows.
    features = np.asarray([event["features"] for event in events], dtype="float64").reshape(-1, input_size)
    input_mean, input_std = _mean_std(features)
    output_mean, output_std = _mean_std(windows.targets)
    manifest = ModelManifest(
        cell=cell,
        input_size=input_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        output_size=output_size,
        feature_names=tuple(feature_names) if feature_names is not None else None,
        input_mean=tuple(input_mean.tolist()),
        input_std=tuple(input_std.tolist()),
        output_mean=tuple(output_mean.tolist()),
        output_std=tuple(output_std.tolist()),
        seq_len=seq_len,
    )
    inputs = torch.tensor((windows.inputs - input_mean) / input_std, dtype=torch.float32)
    targets = torch.tensor((windows.targets - output_mean) / output_std, dtype=torch.float32)

    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    started = time.perf_counter()
    try:
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state_dict, losses = _run_epochs(manifest, inputs, targets, epochs, learning_rate, batch_size, seed)
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)
    seconds = time.perf_counter() - started
    logger.info(
        "trained %s on %d windows in %.1f s: loss %.4f -> %.4f", cell, len(windows), seconds, losses[0], losses[-1]
    )
    return TrainingResult(state_dict, manifest, tuple(losses), len(windows), seconds)


def _run_epochs(
    manifest: ModelManifest,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    net = SeedNet.from_manifest(manifest)
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    loss_function = nn.MSELoss()
    shuffle = torch.Generator().manual_seed(seed)
    count = len(targets)
    losses: list[float] = []
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(count, generator=shuffle)
        total = 0.0
        for start in range(0, count, batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_function(net(inputs[batch]), targets[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / count)
        logger.debug("epoch %d/%d: loss %.5f", epoch + 1, epochs, losses[-1])
    net.eval()
    state_dict = {key: value.detach().clone() for key, value in net.state_dict().items()}
    return state_dict, losses


def train_seed_net(
    events: Iterable[dict],
    *,
    seq_len: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    epochs: int = 30,
    learning_rate: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    cell: str = "lstm",
    feature_names: Sequence[str] | None = None,
) -> tuple[dict[str, torch.Tensor], ModelManifest]:
    """Train a seed network on ``events`` and return its ``state_dict`` and manifest.

    This is :func:`fit_seed_net` without the loss curve.
    """
    result = fit_seed_net(
        events,
        seq_len=seq_len,
        hidden_size=hidden_size,
        num_layers=num_layers,
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        seed=seed,
        cell=cell,
        feature_names=feature_names,
    )
    return result.state_dict, result.manifest


def predict_windows(state_dict: dict[str, torch.Tensor], manifest: ModelManifest, windows: WindowSet) -> np.ndarray:
    """Run the seed network over raw-unit windows and return predictions in target units, shape (N, O)."""
    if len(windows) == 0:
        return np.zeros((0, manifest.output_size))
    input_mean = np.asarray(manifest.input_mean or (0.0,) * manifest.input_size)
    input_std = np.asarray(manifest.input_std or (1.0,) * manifest.input_size)
    output_mean = np.asarray(manifest.output_mean or (0.0,) * manifest.output_size)
    output_std = np.asarray(manifest.output_std or (1.0,) * manifest.output_size)
    net = SeedNet.from_manifest(manifest)
    net.load_state_dict(state_dict)
    net.eval()
    with torch.no_grad():
        scaled = torch.tensor((windows.inputs - input_mean) / input_std, dtype=torch.float32)
        outputs = net(scaled).double().numpy()
    return outputs * output_std + output_mean


def evaluate_windows(
    state_dict: dict[str, torch.Tensor],
    manifest: ModelManifest,
    events: Iterable[dict],
    *,
    last_value_feature: int | None = None,
) -> WindowMetrics:
    """Score the model on the ``manifest.seq_len`` windows of ``events`` against the mean and last-value baselines.

    ``last_value_feature`` is the index of the feature that the last-value baseline predicts as the target,
    for example 0 for the fertility rate.
    """
    if manifest.seq_len is None:
        raise ConfigError("the manifest has no seq_len: expected the window length the model was trained with")
    windows = build_windows(events, manifest.seq_len)
    if len(windows) == 0:
        raise ConfigError(f"no windows of {manifest.seq_len} events with a target to evaluate")
    predictions = predict_windows(state_dict, manifest, windows)
    errors = predictions - windows.targets
    mean_prediction = np.asarray(manifest.output_mean or (0.0,) * manifest.output_size)
    last_value_mae = None
    if last_value_feature is not None:
        last_values = windows.inputs[:, -1, last_value_feature : last_value_feature + 1]
        last_value_mae = float(np.abs(last_values - windows.targets).mean())
    return WindowMetrics(
        windows=len(windows),
        mae=float(np.abs(errors).mean()),
        rmse=math.sqrt(float((errors**2).mean())),
        mean_mae=float(np.abs(mean_prediction - windows.targets).mean()),
        last_value_mae=last_value_mae,
    )


@dataclass(frozen=True)
class BundleResult:
    """Outcome of :func:`train_bundle`: the bundle path, the training result and the holdout accuracy."""

    path: Path
    training: TrainingResult
    holdout: WindowMetrics


def train_bundle(
    output_path: str | Path,
    *,
    seq_len: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    epochs: int = 30,
    learning_rate: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    cell: str = "lstm",
) -> BundleResult:
    """Train on the fertility train split, save a bundle at ``output_path``, and score it on the holdout split.

    The manifest names the features ``fertility_rate`` and ``fertility_change``. The holdout score
    includes the last-value baseline, which predicts this year's rate for next year.
    """
    from streamer.data.fertility import FEATURE_NAMES, load_fertility_events

    training = fit_seed_net(
        load_fertility_events("train"),
        seq_len=seq_len,
        hidden_size=hidden_size,
        num_layers=num_layers,
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        seed=seed,
        cell=cell,
        feature_names=FEATURE_NAMES,
    )
    path = Path(output_path)
    save_bundle(path, training.state_dict, training.manifest)
    holdout = evaluate_windows(
        training.state_dict, training.manifest, load_fertility_events("holdout"), last_value_feature=0
    )
    logger.info(
        "saved %s: holdout MAE %.4f over %d windows (last value %.4f, mean %.4f)",
        path, holdout.mae, holdout.windows, holdout.last_value_mae, holdout.mean_mae,
    )
    return BundleResult(path, training, holdout)
