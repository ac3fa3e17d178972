"""Seeded synthetic event streams for scale tests and benchmarks.

Each event is one JSON object, built from numbers that orjson serializes in bulk:
``{"entity": "e-17", "ts": 1733300000000, "features": [...], "reset": false}``, plus ``"target"`` when
targets are requested. The same arguments always produce the same bytes, for any ``batch_size``, and
the first k events are the same for every ``n_events`` >= k.

Entities are named ``f"{entity_prefix}{k}"`` for ``k`` in ``[0, n_entities)``. They are drawn uniformly, or,
with ``zipf_exponent`` set, from a bounded Zipf law where entity ``k`` has probability proportional to
``1 / (k + 1) ** zipf_exponent``, so ``e-0`` is the most frequent. Timestamps start at ``start_ts`` and grow
by ``ts_step_ms`` per event, so they increase over the whole stream and within every entity.

Features are standard normal values rounded to ``decimals``. A target is a fixed seeded linear function of
the features plus Gaussian noise: a number when ``target_size`` is 1, otherwise a list.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson

logger = logging.getLogger(__name__)

DEFAULT_START_TS = 1_733_300_000_000
# Number of events drawn from the random generator at a time. Changing it changes the generated events.
_CHUNK_SIZE = 65_536


class _EntitySampler:
    """Draws entity indices uniformly or from a bounded Zipf law."""

    def __init__(self, n_entities: int, zipf_exponent: float | None) -> None:
        self.n_entities = n_entities
        self.cumulative: np.ndarray | None = None
        if zipf_exponent is not None:
            weights = 1.0 / np.arange(1, n_entities + 1, dtype="float64") ** zipf_exponent
            cumulative = np.cumsum(weights)
            self.cumulative = cumulative / cumulative[-1]

    def draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        if self.cumulative is None:
            return rng.integers(0, self.n_entities, size=count)
        indices = np.searchsorted(self.cumulative, rng.random(count), side="right")
        # Rounding in the cumulative sum can leave its last value a hair below 1.0.
        return np.minimum(indices, self.n_entities - 1)


def _validate(
    n_events: int,
    n_entities: int,
    input_size: int,
    batch_size: int,
    zipf_exponent: float | None,
    reset_probability: float,
    target_size: int,
    decimals: int,
) -> None:
    checks = (
        (n_events >= 0, f"n_events must be >= 0, got {n_events}"),
        (n_entities >= 1, f"n_entities must be >= 1, got {n_entities}"),
        (input_size >= 1, f"input_size must be >= 1, got {input_size}"),
        (batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"),
        (zipf_exponent is None or 0 < zipf_exponent < math.inf,
         f"zipf_exponent must be a finite number > 0 or None, got {zipf_exponent}"),
        (0.0 <= reset_probability <= 1.0, f"reset_probability must be in [0, 1], got {reset_probability}"),
        (target_size >= 1, f"target_size must be >= 1, got {target_size}"),
        (decimals >= 0, f"decimals must be >= 0, got {decimals}"),
    )
    for passed, message in checks:
        if not passed:
            raise ValueError(message)


def _json_rows(matrix: np.ndarray) -> list[bytes]:
    """Serialize each row of a 2-D float array as comma-separated JSON numbers, without brackets."""
    # orjson writes the matrix as [[a,b],[c,d]]. Rows contain only numbers, so "],[" separates them.
    return orjson.dumps(matrix, option=orjson.OPT_SERIALIZE_NUMPY)[2:-2].split(b"],[")


def _iter_chunks(
    n_events: int,
    sampler: _EntitySampler,
    input_size: int,
    seed: int,
    with_target: bool,
    target_size: int,
    reset_probability: float,
    start_ts: int,
    ts_step_ms: int,
    entity_prefix: str,
    decimals: int,
) -> Iterator[list[bytes]]:
    weight_rng = np.random.default_rng([seed, 1])
    target_weights = weight_rng.standard_normal((input_size, target_size)) / np.sqrt(input_size)
    rng = np.random.default_rng([seed, 0])
    # The prefix is escaped once, so any string is valid inside the JSON entity value.
    entity_template = b'{"entity":"' + orjson.dumps(entity_prefix)[1:-1] + b'%d","ts":%d,"features":[%s],"reset":%s'

    for chunk_start in range(0, n_events, _CHUNK_SIZE):
        count = min(_CHUNK_SIZE, n_events - chunk_start)
        # Every chunk draws full-size arrays, and a short last chunk drops the surplus, so the first k
        # events are the same for every n_events >= k.
        entity_indices = sampler.draw(rng, _CHUNK_SIZE)[:count]
        features = np.round(rng.standard_normal((_CHUNK_SIZE, input_size))[:count], decimals)
        resets = rng.random(_CHUNK_SIZE)[:count] < reset_probability
        ts_values = start_ts + (chunk_start + np.arange(count, dtype="int64")) * ts_step_ms
        heads = [
            entity_template % (entity, ts, row, b"true" if reset else b"false")
            for entity, ts, row, reset in zip(
                entity_indices.tolist(), ts_values.tolist(), _json_rows(features), resets.tolist()
            )
        ]

        if not with_target:
            yield [head + b"}" for head in heads]
            continue

        noise = 0.1 * rng.standard_normal((_CHUNK_SIZE, target_size))[:count]
        targets = np.round(features @ target_weights + noise, decimals)
        if target_size == 1:
            target_values = _json_rows(targets.reshape(1, count))[0].split(b",")
        else:
            target_values = [b"[" + row + b"]" for row in _json_rows(targets)]
        yield [b'%s,"target":%s}' % (head, target) for head, target in zip(heads, target_values)]


def iter_event_batches(
    n_events: int,
    n_entities: int,
    input_size: int,
    batch_size: int = _CHUNK_SIZE,
    seed: int = 0,
    *,
    with_target: bool = False,
    target_size: int = 1,
    zipf_exponent: float | None = None,
    reset_probability: float = 0.0,
    start_ts: int = DEFAULT_START_TS,
    ts_step_ms: int = 1,
    entity_prefix: str = "e-",
    decimals: int = 4,
) -> Iterator[list[bytes]]:
    """Yield ``n_events`` serialized events in lists of ``batch_size`` (the last list may be shorter).

    Each item is the UTF-8 JSON of one event, without a trailing newline. Random values are drawn in
    fixed internal chunks, so the events do not depend on ``batch_size``. See the module docstring for
    the event layout, the entity distribution and how targets are made.
    """
    _validate(n_events, n_entities, input_size, batch_size, zipf_exponent, reset_probability, target_size, decimals)
    chunks = _iter_chunks(
        n_events,
        _EntitySampler(n_entities, zipf_exponent),
        input_size,
        seed,
        with_target,
        target_size,
        reset_probability,
        start_ts,
        ts_step_ms,
        entity_prefix,
        decimals,
    )
    if batch_size == _CHUNK_SIZE:
        yield from chunks
        return

    pending: list[bytes] = []
    for chunk in chunks:
        pending.extend(chunk)
        while len(pending) >= batch_size:
            yield pending[:batch_size]
            del pending[:batch_size]
    if pending:
        yield pending


def write_synthetic(
    path: str | Path,
    n_events: int,
    n_entities: int,
    input_size: int,
    *,
    seed: int = 0,
    batch_size: int = _CHUNK_SIZE,
    **options: object,
) -> int:
    """Write synthetic events to ``path`` as JSON Lines and return the number of events written.

    ``options`` are the keyword options of :func:`iter_event_batches` (``with_target``, ``zipf_exponent``,
    ``reset_probability`` and so on).
    """
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise ValueError(f"unsupported suffix {path.suffix!r} in {path}: write_synthetic writes .jsonl only")
    written = 0
    with path.open("wb") as handle:
        for batch in iter_event_batches(n_events, n_entities, input_size, batch_size, seed, **options):
            handle.write(b"\n".join(batch))
            handle.write(b"\n")
            written += len(batch)
    logger.info("wrote %d synthetic events for %d entities to %s", written, n_entities, path)
    return written
