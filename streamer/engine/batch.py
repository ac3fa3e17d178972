"""Batches of decoded events and the engine's results for them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamer.state.arena import NO_TIME


@dataclass
class EventBatch:
    """Valid events in arrival order, as parallel columns.

    ``offsets`` are input positions (the Kafka offset, or the record index of a file) and ``partitions`` the
    input partition (0 for a file). ``ts_ms`` holds epoch milliseconds, or ``NO_TIME`` where unknown.
    ``targets`` carries each event's optional ``target`` through to its output unchanged. ``streams``
    numbers the input streams (one partition of one topic) whose offsets are comparable; None means the
    partitions, as for one input topic or a file.
    """

    entities: list[str]
    features: np.ndarray
    ts_ms: np.ndarray
    resets: np.ndarray
    offsets: np.ndarray
    partitions: np.ndarray
    targets: list[Any] | None = None
    record_index: np.ndarray | None = None
    streams: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.entities)

    @classmethod
    def build(cls, entities: list[str], features, *, ts_ms=None, resets=None, offsets=None, partitions=None,
              targets=None) -> EventBatch:
        """Build a batch from lists, filling defaults: no timestamps, no resets, offsets 0..n-1, partition 0."""
        n = len(entities)
        return cls(
            entities=list(entities),
            features=np.asarray(features, np.float32).reshape(n, -1),
            ts_ms=np.full(n, NO_TIME, np.int64) if ts_ms is None else np.asarray(ts_ms, np.int64),
            resets=np.zeros(n, bool) if resets is None else np.asarray(resets, bool),
            offsets=np.arange(n, dtype=np.int64) if offsets is None else np.asarray(offsets, np.int64),
            partitions=np.zeros(n, np.int32) if partitions is None else np.asarray(partitions, np.int32),
            targets=targets,
        )

    def part(self, start: int, stop: int) -> EventBatch:
        """Return the events at positions ``start`` to ``stop`` (exclusive) as a batch of their own."""
        at = slice(start, stop)
        return EventBatch(
            entities=self.entities[at], features=self.features[at], ts_ms=self.ts_ms[at], resets=self.resets[at],
            offsets=self.offsets[at], partitions=self.partitions[at],
            targets=None if self.targets is None else self.targets[at],
            record_index=None if self.record_index is None else self.record_index[at],
            streams=None if self.streams is None else self.streams[at],
        )


@dataclass
class StepResult:
    """Per-event results, aligned with the batch.

    ``applied`` is False for a duplicate: an event at or below its entity's last applied offset, which
    advanced nothing and has no prediction (its row in ``predictions`` is NaN, its ``steps`` is -1).
    """

    predictions: np.ndarray
    steps: np.ndarray
    applied: np.ndarray
    waves: int = 0
    inference_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        return int(self.applied.size - np.count_nonzero(self.applied))

    @classmethod
    def concatenate(cls, results: list[StepResult]) -> StepResult:
        """Join the results of consecutive parts of one batch."""
        return cls(np.concatenate([r.predictions for r in results]), np.concatenate([r.steps for r in results]),
                   np.concatenate([r.applied for r in results]), waves=sum(r.waves for r in results),
                   inference_s=sum(r.inference_s for r in results))
